"""`kvtier bench multiturn` stall diagnostics: the slowest steps with their composition, Triton
compiles per step and per run, time in steps over STALL_S; and the engine's step records."""

from __future__ import annotations

import json

import pytest
import torch

from kvtier.benchmarks.multiturn import NUM_SLOW_STEPS, STALL_S, MultiturnConfig, run_multiturn, stall_line, stall_stats
from kvtier.engine.llm_engine import StepRecord

TINY = dict(model="tiny-llama", load_format="dummy", skip_tokenizer_init=True)
SLOW_STEP_KEYS = {"start_s", "seconds", "num_seqs", "num_prefill_tokens", "num_decode_tokens", "sum_seq_lens",
                  "num_blocks_loaded", "num_blocks_stored", "num_compiles"}


def _step(seconds: float, compiled: int | None, end_time: float = 100.0, **kw) -> StepRecord:
    fields = dict(num_tokens=3, num_seqs=2, decode_only=False, sum_seq_lens=40, num_prefill_tokens=2,
                  num_decode_tokens=1, num_blocks_loaded=0, num_blocks_stored=1)
    return StepRecord(**{**fields, **kw}, seconds=seconds, end_time=end_time, compiled_variants=compiled)


def test_slowest_steps_compiles_and_stall_time_from_known_steps():
    seconds = [0.01, 0.9, 0.02, 1.5, 0.6] + [0.001 * i for i in range(20)]
    compiled = [5, 6, 6, 8, 8] + [8] * 20
    steps = [_step(s, c, end_time=90.0 + i) for i, (s, c) in enumerate(zip(seconds, compiled))]
    out = stall_stats(steps, 5, 9, t0=80.0)
    assert out["num_compiles"] == 4  # counted around the whole run, not only inside steps
    assert out["stall_seconds"] == pytest.approx(0.9 + 1.5 + 0.6) and out["num_stall_steps"] == 3
    slow = out["slow_steps"]
    assert len(slow) == NUM_SLOW_STEPS and set(slow[0]) == SLOW_STEP_KEYS
    assert [s["seconds"] for s in slow[:4]] == [1.5, 0.9, 0.6, 0.02]
    assert [s["num_compiles"] for s in slow[:4]] == [2, 1, 0, 0]  # per step: from the previous record
    assert slow[0]["start_s"] == pytest.approx(93.0 - 1.5 - 80.0)
    assert "4 Triton compiles" in stall_line({"cpu_tier": False, **out})


def test_unknown_compile_counts_stay_unknown():
    out = stall_stats([_step(0.7, None), _step(0.1, None)], None, None, t0=0.0)
    assert out["num_compiles"] is None and [s["num_compiles"] for s in out["slow_steps"]] == [None, None]
    assert "unknown Triton compiles" in stall_line({"cpu_tier": True, **out})
    assert stall_stats([], 3, 3, t0=0.0) == {"slow_steps": [], "num_compiles": 0, "stall_seconds": 0,
                                             "num_stall_steps": 0}
    # STALL_S is the threshold stall_stats applies: a step of exactly STALL_S is no stall, one just over it is
    out = stall_stats([_step(STALL_S, None), _step(STALL_S * 1.01, None)], None, None, t0=0.0)
    assert out["num_stall_steps"] == 1 and out["stall_seconds"] == pytest.approx(STALL_S * 1.01)


def test_multiturn_json_has_the_stall_diagnostics(tmp_path, capsys):
    out = tmp_path / "mt.json"
    cfg = MultiturnConfig(dataset="random", num_conversations=3, num_turns=2, user_len=20, output_len=4,
                          think_time=0.01, cpu_tier="off,on", output_json=str(out), warmup_conversations=0)
    run_multiturn(cfg, TINY, progress=False)
    printed = capsys.readouterr().out
    for run in json.loads(out.read_text())["runs"]:
        assert {"slow_steps", "num_compiles", "stall_seconds"} <= set(run)
        assert 0 < len(run["slow_steps"]) <= NUM_SLOW_STEPS
        assert all(set(s) == SLOW_STEP_KEYS for s in run["slow_steps"])
        if not torch.cuda.is_available():
            assert run["num_compiles"] in (None, 0)  # the CPU runs no compiled Triton kernel
        steps = run["slow_steps"]
        assert sum(s["num_prefill_tokens"] for s in steps) + sum(s["num_decode_tokens"] for s in steps) > 0
        assert f"cpu tier {'on' if run['cpu_tier'] else 'off'}: " in printed
