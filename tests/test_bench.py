"""`kvtier bench throughput` on the CPU, its HF comparison, and the tolerant ShareGPT reader."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import greedy, random_prompts
from kvtier import LLM
from kvtier.benchmarks.datasets import read_sharegpt
from kvtier.benchmarks.throughput import hf_model_sharing_weights
from kvtier.cli import main

REQUIRED = {"device", "torch_version", "model", "batch_size", "input_len", "output_len", "decode_step_ms",
            "roofline_step_ms", "roofline_fraction", "prefill_mfu", "output_tok_s", "hf_output_tok_s",
            "speedup_vs_hf", "date"}


def test_bench_throughput_writes_json_with_hf_comparison(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "throughput", "--model", "tiny-llama", "--load-format", "dummy", "--num-prompts", "4",
                 "--input-len", "40", "--output-len", "8", "--compare", "hf", "--output-json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert REQUIRED <= set(res)
    assert res["batch_size"] == 4 and res["num_prompts"] == 4 and res["output_len"] == 8
    assert res["roofline_fraction"] == pytest.approx(res["roofline_step_ms"] / res["decode_step_ms"])
    assert res["speedup_vs_hf"] == pytest.approx(res["output_tok_s"] / res["hf_output_tok_s"])
    assert "roofline_fraction" in capsys.readouterr().out
    assert (res["temperature"], res["top_p"], res["top_k"]) == (0.0, 1.0, 0)
    # the bound: every step at its roofline or its FLOPs at the matmul rate, never above the run
    assert 0 < res["e2e_roofline_fraction"] == pytest.approx(res["bound_s"] / res["elapsed_s"])
    assert res["e2e_roofline_fraction"] < 1


def test_bench_throughput_samples_as_asked(tmp_path, monkeypatch):
    """--temperature/--top-p/--top-k reach every request of the timed run and the JSON."""
    seen = []
    generate = LLM.generate
    monkeypatch.setattr(LLM, "generate", lambda self, prompts, params, **kw: seen.append(params) or
                        generate(self, prompts, params, **kw))
    out = tmp_path / "sampled.json"
    assert main(["bench", "throughput", "--model", "tiny-llama", "--load-format", "dummy", "--num-prompts", "2",
                 "--input-len", "16", "--output-len", "4", "--output-json", str(out),
                 "--temperature", "1.0", "--top-p", "0.9", "--top-k", "50"]) == 0
    res = json.loads(out.read_text())
    assert (res["temperature"], res["top_p"], res["top_k"]) == (1.0, 0.9, 50)
    timed = seen[-1]
    assert len(timed) == 2 and all((p.temperature, p.top_p, p.top_k) == (1.0, 0.9, 50) for p in timed)


def test_hf_model_sharing_weights_generates_our_tokens():
    """The HF baseline runs on exactly our weights: its greedy tokens equal ours (fp32)."""
    llm = LLM("tiny-qwen2", load_format="dummy", dtype="float32", max_model_len=128)
    prompt = random_prompts([12])[0]
    ours = llm.generate([prompt], greedy(10), use_tqdm=False)[0].outputs[0].token_ids
    hf = hf_model_sharing_weights(llm)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
    assert ours == ref


def test_sharegpt_reader_recovers_every_whole_conversation():
    n = 0
    for conv in read_sharegpt():
        assert conv["conversations"] is not None
        n += 1
    assert n == 17671  # the package's JSON is cut off after this many whole conversations


def test_bench_expansion_sweeps_fractions_and_runs_the_controller(tmp_path, capsys):
    """`kvtier bench expansion` on the CPU: each fraction's far blocks are what was asked (of the
    full blocks), each point has its prediction, and the issue's keys are in the JSON."""
    out = tmp_path / "expansion.json"
    assert main(["bench", "expansion", "--model", "tiny-llama", "--load-format", "dummy", "--skip-tokenizer-init",
                 "--kv-offloading-size", "0.05", "--kv-expansion", "0.3", "--batch", "4", "--input-len", "64",
                 "--fractions", "0,0.1,0.3", "--steps", "3", "--controller-steps", "8", "--max-model-len", "256",
                 "--block-size", "4", "--output-json", str(out), "--plot", str(tmp_path / "expansion.png")]) == 0
    res = json.loads(out.read_text())
    assert (tmp_path / "expansion.png").stat().st_size > 0
    assert {"feature", "device", "far_tier", "knee_fraction", "predicted_fraction", "controller_fraction",
            "controller_slowdown"} <= set(res)
    assert (res["feature"], res["far_tier"]) == ("expansion", "cpu")
    points = res["points"]
    assert [p["fraction"] for p in points] == [0.0, 0.1, 0.3] and points[0]["far_blocks"] == 0
    for p in points[1:]:  # each request rounds its share up or down: within a block a request
        assert p["fraction"] * p["full_blocks"] - 4 <= p["far_blocks"] <= p["fraction"] * p["full_blocks"] + 4
    assert all(p["predicted_ms"] >= p["reference_ms"] for p in points)
    assert "knee" in capsys.readouterr().out


def test_bench_expansion_capacity_workload(tmp_path):
    """The capacity workload: KV 1.25x the GPU pool; without expansion requests preempt each other,
    with half the blocks far none has to, and every setting's output_tok_s is in the JSON."""
    out = tmp_path / "capacity.json"
    assert main(["bench", "expansion", "--no-sweep", "--model", "tiny-llama", "--load-format", "dummy",
                 "--skip-tokenizer-init", "--kv-offloading-size", "0.05", "--kv-expansion", "0.5",
                 "--capacity-prompts", "8", "--capacity-input-len", "64", "--capacity-output-len", "16",
                 "--max-model-len", "256", "--block-size", "4", "--output-json", str(out)]) == 0
    res = json.loads(out.read_text())
    runs = res["capacity"]["settings"]
    assert set(res["output_tok_s"]) == {"off", "swap", "expansion"}
    assert res["capacity"]["gpu_blocks"] == int(8 * 20 / 1.25)  # 80 tokens a request in 4-token blocks
    assert runs["off"]["num_preemptions"] > 0 and runs["swap"]["num_swaps"] > 0
    assert runs["expansion"]["num_preemptions"] == 0 and runs["expansion"]["max_far_blocks"] > 0


def test_bench_kvpr_compares_full_transfer_and_recomputation(tmp_path, capsys):
    """`kvtier bench kvpr` on the CPU: every full block far while decode is timed, KVPR's share as
    forced, the prefix hit by each mode, and the issue's keys in the JSON."""
    out = tmp_path / "kvpr.json"
    assert main(["bench", "kvpr", "--model", "tiny-opt", "--load-format", "dummy", "--skip-tokenizer-init",
                 "--kv-offloading-size", "0.05", "--batch", "4", "--input-len", "40", "--output-len", "6",
                 "--modes", "off,1.0", "--prefix-len", "48", "--prefix-reps", "1", "--block-size", "4",
                 "--flexgen-decode-tok-s", "50", "--output-json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"feature", "device", "model", "split_fraction", "kvtier_decode_tok_s", "full_transfer_decode_tok_s",
            "speedup_vs_full_transfer", "flexgen_decode_tok_s"} <= set(res)
    assert res["feature"] == "kvpr" and res["flexgen_decode_tok_s"] == 50
    assert res["decode"]["off"]["split_fraction"] == 0 and res["split_fraction"] == 1.0
    assert all(p["far_share"] >= 0.8 for p in res["decode"].values())  # 10-12 full blocks a request, the newest lag
    assert res["prefix_hit"]["1.0"]["split_fraction"] > 0 and res["prefix_hit"]["off"]["split_fraction"] == 0
    assert "FlexGen" in capsys.readouterr().out
