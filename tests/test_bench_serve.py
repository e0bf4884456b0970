"""`kvtier bench serve` against a live `kvtier serve` (default model, CPU): table, JSON and PNG, and
token counts and prefix-cache hits that follow from the dataset."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from kvtier import LLM
from kvtier.cli import main
from kvtier.server import BackgroundServer, ServerConfig, create_app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    llm = LLM(max_model_len=1024, kv_cache_memory="256MiB", dtype="float32")
    with BackgroundServer(create_app(llm, ServerConfig(("smol",)))) as srv:
        yield srv


def bench(server: BackgroundServer, tmp_path, *flags: str) -> tuple[int, dict]:
    out = tmp_path / "result.json"
    rc = main(["bench", "serve", "--base-url", server.base_url, "--result-file", str(out), *flags])
    return rc, json.loads(out.read_text())


def test_random_completions_table_json_and_plot(server, tmp_path, capsys):
    plot = tmp_path / "plot.png"
    rc, res = bench(server, tmp_path, "--dataset", "random", "--num-prompts", "4", "--random-input-len", "24",
                    "--random-output-len", "6", "--ignore-eos", "--request-rate", "20", "--plot-file", str(plot))
    assert rc == 0
    table = capsys.readouterr().out
    for line in ("Serving Benchmark Result", "Successful requests:", "Mean TTFT (ms):", "P99 ITL (ms):",
                 "Median TPOT (ms):", "Output token throughput (tok/s):"):
        assert line in table
    assert (res["completed"], res["failed"], res["errors"]) == (4, 0, [])
    assert res["total_input_tokens"] == 4 * 24  # token-id prompts: exact lengths, counted by the server
    assert res["total_output_tokens"] == 4 * 6 and res["output_lens"] == [6] * 4
    assert len(res["ttfts"]) == 4 and all(len(gaps) == 5 for gaps in res["itls"])
    assert 0 < res["median_ttft_ms"] <= res["p99_ttft_ms"] and res["mean_e2el_ms"] > res["mean_ttft_ms"]
    # TPOT: each request's time after its first token over its 5 later tokens; ITL: every gap
    tpots = [(e2el - ttft) / 5 for e2el, ttft in zip(res["e2els"], res["ttfts"])]
    assert res["mean_tpot_ms"] == pytest.approx(1000 * sum(tpots) / 4)
    assert res["mean_itl_ms"] == pytest.approx(1000 * sum(map(sum, res["itls"])) / 20)
    assert res["output_throughput"] == pytest.approx(24 / res["duration"])
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_prefix_repetition_hits_the_prefix_cache(server, tmp_path):
    rc, res = bench(server, tmp_path, "--dataset", "prefix-repetition", "--num-prompts", "5", "--prefix-len", "64",
                    "--num-prefixes", "2", "--random-input-len", "8", "--random-output-len", "2",
                    "--max-concurrency", "1", "--seed", "5")
    assert rc == 0 and res["completed"] == 5 and res["total_input_tokens"] == 5 * 72
    # One at a time, so every prompt after each prefix's first finds its 64 tokens (4 blocks) cached.
    assert res["total_cached_tokens"] >= 3 * 64
    assert res["cached_tokens_by_tier"]["gpu"] == res["total_cached_tokens"]


def test_multi_turn_chat_prompts_extend_the_previous_turn(server, tmp_path):
    rc, res = bench(server, tmp_path, "--endpoint", "chat", "--dataset", "multi-turn", "--num-prompts", "4",
                    "--num-turns", "2", "--random-input-len", "16", "--random-output-len", "4", "--seed", "7")
    assert rc == 0 and res["completed"] == 4
    first, second = sorted(res["input_lens"])[:2], sorted(res["input_lens"])[2:]
    assert min(second) > max(first)  # a second turn carries the first turn, its reply and a new message
    assert res["total_cached_tokens"] > 0


def test_sharegpt_chat(server, tmp_path):
    rc, res = bench(server, tmp_path, "--endpoint", "chat", "--dataset", "sharegpt", "--num-prompts", "3",
                    "--sharegpt-output-len", "4", "--ignore-eos")
    assert rc == 0 and res["completed"] == 3 and res["total_output_tokens"] == 12


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the benchmark connects
    rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1"])
    assert rc == 2 and "cannot list the models" in capsys.readouterr().err
