"""`kvtier bench multiturn`: turn prompts grow by the previous answer, TTFT statistics, JSON and plot,
prefix hits across turns, and the CLI on the default model with ShareGPT."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvtier.benchmarks.multiturn import MultiturnConfig, random_conversations, run_multiturn, ttft_stats
from kvtier.cli import build_parser, main
from kvtier.engine.llm_engine import LLMEngine

TINY = dict(model="tiny-llama", load_format="dummy", skip_tokenizer_init=True)
RANDOM = dict(dataset="random", num_conversations=3, num_turns=3, user_len=24, output_len=6, think_time=0.01)
RUN_KEYS = {"cpu_tier", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "output_tok_s", "hit_tokens", "num_turns",
            "duration_s", "num_prompt_tokens", "kv_usage_peak", "bytes_to_cpu", "bytes_to_gpu", "num_swaps_out",
            "engine_config", "turns"}


@pytest.fixture
def engine_spy(monkeypatch):
    """Records the prompt ids each benchmark turn handed the engine and the ids it generated."""
    seen: dict[str, dict] = {}
    add, step = LLMEngine.add_request, LLMEngine.step

    def add_request(self, prompt, params=None, request_id=None, **kw):
        if request_id is not None and request_id.startswith("conv"):
            seen[request_id] = {"prompt": list(prompt["prompt_token_ids"])}
        return add(self, prompt, params, request_id, **kw)

    def spy_step(self, final_only=False):
        outs = step(self, final_only)
        for out in outs:
            if out.finished and out.request_id in seen:
                seen[out.request_id]["output"] = list(out.outputs[0].token_ids)
        return outs
    monkeypatch.setattr(LLMEngine, "add_request", add_request)
    monkeypatch.setattr(LLMEngine, "step", spy_step)
    return seen


def test_ttft_stats_from_known_values():
    s = ttft_stats([float(v) for v in range(1, 101)])
    assert s["mean"] == pytest.approx(50.5) and s["p50"] == pytest.approx(50.5)
    assert s["p99"] == pytest.approx(99.01)  # linear interpolation between 99 and 100
    assert ttft_stats([0.25]) == {"mean": 0.25, "p50": 0.25, "p99": 0.25}
    s = ttft_stats([0.1, 0.3, 0.2, 1.0])
    assert s["mean"] == pytest.approx(0.4) and s["p50"] == pytest.approx(0.25)
    assert s["p99"] == pytest.approx(0.3 + 0.97 * 0.7)


def test_each_turn_extends_previous_prompt_and_output(engine_spy):
    cfg = MultiturnConfig(**RANDOM, max_active=2, cpu_tier="off")
    res = run_multiturn(cfg, TINY, progress=False)
    convs = random_conversations(3, 3, 24, 6, 512, seed=0)  # what the run built (seed 0, tiny vocab)
    assert len(engine_spy) == 9
    for c, conv in enumerate(convs):
        prev: list[int] = []
        for t in range(3):
            turn = engine_spy[f"conv{c}-turn{t}"]
            assert turn["prompt"] == prev + conv.user_turns[t]
            assert len(turn["output"]) == 6
            prev = turn["prompt"] + turn["output"]
    # --max-active 2: the third conversation opens only once another has finished its last turn
    turns = res["runs"][0]["turns"]
    first_end = min(t["submit_s"] + t["e2e_s"] for t in turns if t["turn"] == 2)
    assert next(t["submit_s"] for t in turns if t["conversation"] == 2 and t["turn"] == 0) >= first_end


def test_json_has_both_settings_and_plot_is_png(tmp_path):
    out, png = tmp_path / "mt.json", tmp_path / "mt.png"
    cfg = MultiturnConfig(**RANDOM, output_json=str(out), plot=str(png))
    run_multiturn(cfg, TINY, progress=False)
    runs = json.loads(out.read_text())["runs"]
    assert [r["cpu_tier"] for r in runs] == [False, True]  # default order: off, then on
    for run in runs:
        assert RUN_KEYS <= set(run)
        assert set(run["hit_tokens"]) == {"gpu", "cpu"} and run["num_turns"] == 9
        assert run["ttft_p50_s"] <= run["ttft_p99_s"] and run["output_tok_s"] > 0
        assert run["num_output_tokens"] == 9 * 6
    assert runs[0]["engine_config"]["kv_offloading_size"] == 0
    assert runs[1]["engine_config"]["kv_offloading_size"] > 0
    blocks = {r["engine_config"]["num_gpu_blocks_override"] for r in runs}
    assert len(blocks) == 1 and blocks.pop() >= 7  # one GPU pool size; 90-token conversations need 6 blocks
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_later_turns_hit_the_prefix_cache(prefix_caching):
    cfg = MultiturnConfig(**RANDOM, gpu_kv_fraction=2.0, cpu_tier="off")  # the GPU pool holds everything
    run = run_multiturn(cfg, {**TINY, "enable_prefix_caching": prefix_caching}, progress=False)["runs"][0]
    later = [t for t in run["turns"] if t["turn"] > 0]
    if prefix_caching:
        assert run["hit_tokens"]["gpu"] > 0
        # turn t-1's prompt + output (>= 30 tokens) holds at least one full 16-token block
        assert all(t["num_cached_tokens"] >= 16 for t in later)
    else:
        assert run["hit_tokens"] == {"gpu": 0, "cpu": 0}


def test_parser_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["bench", "multiturn"])
    for f in dataclasses.fields(MultiturnConfig):
        assert getattr(args, f.name) == f.default, f.name


def test_cli_rejects_bad_cpu_tier_setting(capsys):
    assert main(["bench", "multiturn", "--cpu-tier", "maybe"]) == 2
    assert "--cpu-tier" in capsys.readouterr().err


def test_cli_sharegpt_on_default_model(smollm2, tmp_path, capsys):
    out, png = tmp_path / "mt.json", tmp_path / "mt.png"
    assert main(["bench", "multiturn", "--num-conversations", "2", "--num-turns", "2", "--max-output-len", "3",
                 "--think-time", "0.01", "--output-json", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert [r["cpu_tier"] for r in res["runs"]] == [False, True]
    for run in res["runs"]:
        assert run["model"] == "SmolLM2-135M-Instruct" and run["num_turns"] == 4
        assert all(t["num_output_tokens"] <= 3 for t in run["turns"])
        by_turn = {(t["conversation"], t["turn"]): t for t in run["turns"]}
        for c in (0, 1):  # turn 1 resends turn 0's prompt and answer, then the next message
            first, second = by_turn[c, 0], by_turn[c, 1]
            assert second["num_prompt_tokens"] > first["num_prompt_tokens"] + first["num_output_tokens"]
            assert second["num_cached_tokens"] >= 16
    assert png.is_file()
    table = capsys.readouterr().out
    assert "TTFT mean s" in table and "hit cpu" in table
