"""The CPU tier's storage: one KV tensor in pinned host memory, block-major within layer groups.

Layout (groups, num_cpu_blocks, layers_per_group, 2, block_size, kv_heads, head_dim): the layers
are cut into a few groups (LAYER_GROUPS at most; 2 groups of 16 for Llama-3-8B) and, within a
group, one CPU block is one contiguous chunk of its layers' K and V (1 MiB for Llama-3-8B in
bf16), consecutive blocks adjacent. So a run of consecutive CPU blocks moves as one DMA copy per
group, and a load can hand the forward one group at a time: layer i's attention waits only for
its group, not for the whole load (Pie's layer-wise swapping, kvtier/engine/transfer_engine.py).
Fewer, larger groups make larger DMA copies (one copy per 2 MiB block reaches ~90% of the link,
per 512 KiB ~80%); runs of consecutive blocks make them larger still.

The memory is allocated pageable, then page-locked in chunks with cudaHostRegister (a progress
bar shows it; pinning tens of GiB takes seconds). Registered memory is mapped into the GPU's
address space (UVA), so the transfer kernel reads and writes it directly. If pinning a chunk
fails, the pool keeps the chunks already pinned and says so: a smaller tier, never a crash.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

PIN_CHUNK_BYTES = 1 << 30  # per chunk of blocks, across the groups
# At most this many groups (the largest divisor of the layer count not above it). On an H100,
# 256 blocks at scattered CPU ids reloaded at 48.5 / 47.3 / 43.7 GB/s with 1 / 2 / 4 groups
# (DMA copies of 2 MiB / 1 MiB / 512 KiB): 2 keeps the link's rate and halves the first wait.
LAYER_GROUPS = 2
_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 3  # cudaHostRegisterPortable | cudaHostRegisterMapped


def layer_groups(num_layers: int) -> int:
    return max(g for g in range(1, min(LAYER_GROUPS, num_layers) + 1) if num_layers % g == 0)


def pinning_available() -> bool:
    return torch.cuda.is_available()


def _register(ptr: int, num_bytes: int) -> bool:
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, num_bytes, _CUDA_HOST_REGISTER_PORTABLE_MAPPED)
    return int(getattr(err, "value", err)) == 0


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class HostKVPool:
    """Owns the CPU tier's tensor; unregisters the pinned pages before the memory is freed."""

    def __init__(self, num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, pin: bool | None = None):
        groups = layer_groups(num_layers)
        shape = (groups, num_blocks, num_layers // groups, 2, block_size, num_kv_heads, head_dim)
        pin = pinning_available() if pin is None else pin
        self._tensor = torch.zeros(shape, dtype=dtype) if not pin else torch.empty(shape, dtype=dtype)
        self._registered: list[int] = []
        self.pinned = pin
        self.block_bytes = self._tensor[:, 0].numel() * self._tensor.element_size() if num_blocks else 1
        # one copy must not span two registrations (the driver rejects it): copies split here
        self.blocks_per_chunk = max(1, PIN_CHUNK_BYTES // self.block_bytes) if pin else num_blocks
        self.kv = self._pin(self._tensor) if pin else self._tensor  # (G, Nc, L/G, 2, bs, Hkv, D)

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[1]

    def _pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """Register chunks of whole blocks (each group's part of a chunk is one registration);
        on failure keep the blocks pinned in every group."""
        total_blocks, group_block_bytes = tensor.shape[1], tensor[0, 0].numel() * tensor.element_size()
        num_pinned = 0
        with tqdm(total=total_blocks * self.block_bytes, unit="B", unit_scale=True, desc="pinning CPU KV tier",
                  disable=total_blocks * self.block_bytes < 4 * PIN_CHUNK_BYTES) as bar:
            while num_pinned < total_blocks:
                n = min(self.blocks_per_chunk, total_blocks - num_pinned)
                if not self._register_chunk(tensor[:, num_pinned], n * group_block_bytes):
                    break
                num_pinned += n
                bar.update(n * self.block_bytes)
        if num_pinned < total_blocks:
            logger.warning("kvtier: could pin only %.2f of %.2f GiB for the CPU KV tier; using %d of %d "
                           "blocks (lower --kv-offloading-size or raise the locked-memory limit)",
                           num_pinned * self.block_bytes / 2**30, total_blocks * self.block_bytes / 2**30,
                           num_pinned, total_blocks)
        return tensor[:, :num_pinned]

    def _register_chunk(self, first_blocks: torch.Tensor, group_bytes: int) -> bool:
        """first_blocks: (G, ...) the chunk's first block in each group."""
        for block in first_blocks:
            if not _register(block.data_ptr(), group_bytes):
                return False
            self._registered.append(block.data_ptr())
        return True
    def close(self) -> None:
        for ptr in self._registered:
            _unregister(ptr)
        self._registered = []

    def __del__(self) -> None:
        if self._registered:
            self.close()
