"""The server under faults and load: a request failing inside an engine step fails alone; /health
and /metrics answer quickly while a huge prompt is tokenized and while 150 streams run; SIGTERM
ends a long stream with an error event within --shutdown-timeout and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import threading
import time
from collections.abc import Iterator

import httpx2 as httpx
import pytest

from conftest import LiveServer, greedy, random_prompts
from test_fault_isolation import POISON, inject_in_sampler
from test_server import serving, tiny_llm

# -- one request fails inside a step; the streams beside it do not notice -------------------------


async def _stream_tokens(http: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int,
                         started: asyncio.Event | None = None) -> tuple[list[int], list[dict]]:
    """Token ids of one greedy stream, and any error events it carried."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    ids, errors = [], []
    async with http.stream("POST", url, json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
                continue
            ids += event["choices"][0]["token_ids"]
            if started is not None and len(ids) >= 2:
                started.set()
    return ids, errors


async def _three_streams_and_a_poisoned_request(url: str, prompts: list[list[int]]):
    async with httpx.AsyncClient(timeout=120) as http:
        started = [asyncio.Event() for _ in prompts]
        streams = [asyncio.ensure_future(_stream_tokens(http, url, p, 24, s)) for p, s in zip(prompts, started)]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
        poisoned = POISON + prompts[0]
        plain = await http.post(url, json={"prompt": poisoned, "max_tokens": 8, "temperature": 0,
                                           "ignore_eos": True})
        streamed = await _stream_tokens(http, url, poisoned, 8)
        return [await s for s in streams], plain, streamed


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_request_failing_inside_a_step_fails_alone(tiny_path, tiny_ref, async_scheduling):
    prompts = random_prompts([9, 14, 20], seed=31)
    want = [o.outputs[0].token_ids for o in tiny_ref.generate(prompts, greedy(24), use_tqdm=False)]
    llm = tiny_llm(tiny_path, async_scheduling=async_scheduling)
    inject_in_sampler(llm.engine)
    with serving(llm) as server:
        streams, plain, (_, stream_errors) = asyncio.run(
            _three_streams_and_a_poisoned_request(server.base_url + "/v1/completions", prompts))
        health = httpx.get(server.base_url + "/health").status_code
    assert [ids for ids, _ in streams] == want and all(not errors for _, errors in streams)
    assert plain.status_code == 500, plain.text
    error = plain.json()["error"]
    assert "injected fault in the sampler" in error["message"] and error["code"] == "internal_error"
    assert len(stream_errors) == 1 and "injected fault" in stream_errors[0]["message"]
    assert health == 200


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):
    return tiny_model_dir("tiny-llama")[0]


@pytest.fixture(scope="module")
def tiny_ref(tiny_path):
    return tiny_llm(tiny_path)


# -- a live `kvtier serve` on the default model -----------------------------------------------------

def start_server(tmp_path_factory, *extra: str) -> LiveServer:
    return LiveServer("--device", "cpu", "--dtype", "float32", "--max-model-len", "4096", "--kv-cache-memory",
                      "512MiB", *extra, log_dir=tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def live_server(tmp_path_factory) -> Iterator[str]:
    live = start_server(tmp_path_factory)
    try:
        yield live.url
    finally:
        live.stop(60)


class Prober:
    """Times GET /health and GET /metrics, one after the other, from a thread of its own."""

    def __init__(self, url: str):
        self.url, self.times = url, {"/health": [], "/metrics": []}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                for route, times in self.times.items():
                    t0 = time.perf_counter()
                    status = http.get(self.url + route).status_code
                    times.append(time.perf_counter() - t0)
                    if status != 200:
                        self.failures.append(f"{route}: {status}")
                time.sleep(0.05)

    def assert_quick(self, limit_s: float = 0.5) -> None:
        assert not self.failures, self.failures[:5]
        for route, times in self.times.items():
            assert len(times) >= 3, f"{route} answered only {len(times)} times"
            median = statistics.median(times)
            print(f"{route}: median {median * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms over {len(times)} requests")
            assert median <= limit_s, f"{route}: median {median:.3f} s, max {max(times):.3f} s over {len(times)}"


def test_health_and_metrics_answer_while_a_15mib_prompt_is_tokenized(live_server):
    sentence = "The quick brown fox jumps over the lazy dog. "
    prompt = (sentence * ((15 << 20) // len(sentence) + 1))[:15 << 20]
    with Prober(live_server) as prober:
        resp = httpx.post(live_server + "/tokenize", json={"prompt": prompt}, timeout=300)
    assert resp.status_code == 200 and resp.json()["count"] > 1_000_000
    prober.assert_quick()


async def _many_streams(url: str, n: int) -> list[list[int]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        prompts = random_prompts([4 + i % 12 for i in range(n)], vocab=40000, seed=8)
        return [ids for ids, _ in await asyncio.gather(*(_stream_tokens(http, url, p, 8) for p in prompts))]


def test_health_and_metrics_answer_while_150_streams_run(live_server):
    with Prober(live_server) as prober:
        results = asyncio.run(_many_streams(live_server + "/v1/completions", 150))
    assert [len(ids) for ids in results] == [8] * 150
    prober.assert_quick()


# -- SIGTERM: a bounded, graceful shutdown ----------------------------------------------------------

def test_sigterm_ends_a_long_stream_with_an_error_event_and_exits_0(tmp_path_factory):
    timeout_s = 2.0
    live = start_server(tmp_path_factory, "--shutdown-timeout", str(timeout_s))
    proc, url = live.proc, live.url
    try:
        body = {"prompt": "Tell me a very long story.", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
            lines = resp.iter_lines()
            for line in lines:  # the stream is under way
                if line.startswith("data: {"):
                    break
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            events = [line[6:] for line in lines if line.startswith("data: ")]
        returncode = proc.wait(timeout=timeout_s + 5)
        exited_after = time.monotonic() - signalled
    finally:
        proc.kill()
    output = live.output()
    assert returncode == 0, output
    assert exited_after <= timeout_s + 5
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutting_down" and "--shutdown-timeout" in error["message"]
