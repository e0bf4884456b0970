"""The start shared by the GPU scripts in benchmarks/: full sizes need a GPU; a small CPU mode runs
the same code with Triton interpreted."""

from __future__ import annotations

import os
import sys

import torch


def script_device(cpu_mode: bool, flag: str) -> torch.device:
    """The GPU, or the CPU when `cpu_mode` (the script's `flag`) is on; sets TRITON_INTERPRET on
    the CPU, so call it before triton is imported."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not cpu_mode:
            sys.exit(f"no CUDA device: full sizes need a GPU (use {flag} on the CPU)")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device
