"""`kvtier serve` end to end on the CPU: real servers on loopback ports, the official openai client,
outputs equal to the offline API's, OpenAI-shaped errors, disconnects, a load test, and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import LiveServer, greedy, random_prompts
from kvtier import LLM, SamplingParams
from kvtier.cli import build_parser
from kvtier.server import BackgroundServer, ServerConfig, create_app

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TINY_MAX_LEN = 128


def tiny_llm(path, **kw: Any) -> LLM:
    """The conftest tiny Llama (well-conditioned random weights, no tokenizer): prompts are token ids."""
    args = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", max_model_len=TINY_MAX_LEN,
                kv_cache_memory="16MiB")
    return LLM(str(path), **{**args, **kw})


@contextlib.contextmanager
def serving(llm: LLM, **config: Any) -> Iterator[BackgroundServer]:
    cfg = ServerConfig(**{"served_model_names": ("tiny",), **config})
    with BackgroundServer(create_app(llm, cfg)) as server:
        assert httpx.get(server.base_url + "/health").status_code == 200
        yield server


def metrics(server: BackgroundServer) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    text = httpx.get(server.base_url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_idle(server: BackgroundServer, timeout_s: float = 30.0) -> dict:
    """Metrics once nothing runs or waits (aborts reach the engine thread asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(server)
        busy = metric(m, "kvtier_num_requests_running") + metric(m, "kvtier_num_requests_waiting")
        if busy == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    if param is not None:
        assert err["param"] == param
    return err


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):
    return tiny_model_dir("tiny-llama")[0]


@pytest.fixture(scope="module")
def tiny_ref(tiny_path) -> LLM:
    return tiny_llm(tiny_path)


@pytest.fixture(scope="module")
def tiny_server(tiny_path) -> Iterator[BackgroundServer]:
    with serving(tiny_llm(tiny_path), api_key=KEY, max_tokens_limit=64, max_body_bytes=8192) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key=KEY)


# -- completions on token ids: equal to the offline API -------------------------------------------

def test_models_health_and_default_loopback(tiny_server):
    models = httpx.get(tiny_server.base_url + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == TINY_MAX_LEN
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)


def test_completions_equal_offline_tokens_and_logprobs(tiny_client, tiny_ref):
    prompts = random_prompts([5, 17, 9])
    resp = tiny_client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0, logprobs=2,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
    ref = tiny_ref.generate(prompts, greedy(12, logprobs=2), use_tqdm=False)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for choice, out in zip(resp.choices, ref):
        comp = out.outputs[0]
        assert choice.model_extra["token_ids"] == comp.token_ids
        assert choice.model_extra["prompt_token_ids"] == out.prompt_token_ids
        assert choice.finish_reason == "length"
        want = [lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs)]
        assert choice.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
        assert choice.logprobs.tokens == [f"token_id:{t}" for t in comp.token_ids]
        assert all(len(top) in (2, 3) for top in choice.logprobs.top_logprobs)
    assert resp.usage.prompt_tokens == 5 + 17 + 9 and resp.usage.completion_tokens == 36
    assert resp.usage.total_tokens == 31 + 36


def test_streaming_completion_equals_offline_and_ends_with_usage_and_done(tiny_server, tiny_ref):
    prompt = random_prompts([11], seed=7)[0]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    with httpx.stream("POST", tiny_server.base_url + "/v1/completions", json=body, headers=AUTH) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks.pop()
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 10
    assert usage_chunk["usage"]["prompt_tokens"] == 11
    assert usage_chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage_chunk["usage"]["cached_tokens_by_tier"] == {"gpu": 0, "cpu": 0}
    streamed = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert streamed == tiny_ref.generate([prompt], greedy(10), use_tqdm=False)[0].outputs[0].token_ids
    assert len(chunks) == 10 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_openai_client_stream_with_usage(tiny_client, tiny_ref):
    prompt = random_prompts([6], seed=3)[0]
    stream = tiny_client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = list(stream)
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert ids == tiny_ref.generate([prompt], greedy(8), use_tqdm=False)[0].outputs[0].token_ids
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == 6


def test_seeded_n_samples_equal_offline(tiny_client, tiny_ref):
    prompt = random_prompts([8], seed=5)[0]
    resp = tiny_client.completions.create(model="tiny", prompt=prompt, n=3, seed=11, temperature=1.0, max_tokens=6,
                                          extra_body={"ignore_eos": True, "return_token_ids": True, "top_k": 20})
    params = SamplingParams(n=3, seed=11, temperature=1.0, max_tokens=6, ignore_eos=True, top_k=20)
    ref = tiny_ref.generate([prompt], params, use_tqdm=False)[0]
    assert [c.model_extra["token_ids"] for c in resp.choices] == [c.token_ids for c in ref.outputs]
    assert resp.usage.completion_tokens == 18 and resp.usage.prompt_tokens == 8


def test_cache_salt_separates_prefix_caches(tiny_server):
    prompt = random_prompts([40], seed=9)[0]  # 2 full blocks of 16 can be served from the cache

    def cached(salt: str | None) -> dict:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "cache_salt": salt}
        usage = httpx.post(tiny_server.base_url + "/v1/completions", json=body, headers=AUTH).json()["usage"]
        assert usage["cached_tokens_by_tier"]["gpu"] == usage["prompt_tokens_details"]["cached_tokens"]
        return usage["prompt_tokens_details"]["cached_tokens"]

    assert cached("tenant-a") == 0
    assert cached("tenant-a") == 32
    assert cached("tenant-b") == 0  # same prompt, other tenant: no hit
    assert cached(None) == 0


def test_cli_serve_runs_the_server(tmp_path):
    live = LiveServer("tiny-llama", "--load-format", "dummy", "--skip-tokenizer-init", "--device", "cpu",
                      "--max-model-len", "64", "--kv-cache-memory", "8MiB", "--api-key", KEY,
                      "--served-model-name", "first", "alias", "--max-tokens-limit", "8", log_dir=tmp_path,
                      timeout_s=120)
    url = live.url
    try:
        resp = httpx.post(url + "/v1/completions", json={"model": "alias", "prompt": [1, 2, 3], "max_tokens": 3},
                          headers=AUTH)
        assert resp.status_code == 200 and resp.json()["model"] == "first"
        assert_openai_error(httpx.post(url + "/v1/completions", json={"prompt": [1]}), 401)
        assert_openai_error(httpx.post(url + "/v1/completions", json={"prompt": [1], "max_tokens": 9},
                                       headers=AUTH), 400, "max_tokens")
    finally:
        live.stop(30)


# -- errors -------------------------------------------------------------------------------------

def _big_chunked_body() -> Iterator[bytes]:
    yield b'{"model": "tiny", "prompt": "'
    for _ in range(100):
        yield b"x" * 100
    yield b'"}'


ERROR_CASES = {
    "bad temperature": (dict(json={"prompt": [1, 2], "temperature": -1}), 400, "temperature"),
    "temperature not a number": (dict(json={"prompt": [1, 2], "temperature": "hot"}), 400, "temperature"),
    "max_tokens over limit": (dict(json={"prompt": [1, 2], "max_tokens": 65}), 400, "max_tokens"),
    "prompt over model length": (dict(json={"prompt": [5] * TINY_MAX_LEN}), 400, "prompt"),
    "prompt + max_tokens over model length": (dict(json={"prompt": [5] * 100, "max_tokens": 60}), 400, "max_tokens"),
    "token id outside vocabulary": (dict(json={"prompt": [1, 100000]}), 400, "prompt"),
    "text prompt without tokenizer": (dict(json={"prompt": "hello"}), 400, "prompt"),
    "empty prompt list": (dict(json={"prompt": []}), 400, "prompt"),
    "prompt of no accepted type": (dict(json={"prompt": [1.5]}), 400, "prompt"),
    "unknown field": (dict(json={"prompt": [1], "best_of_luck": 1}), 400, "best_of_luck"),
    "unsupported penalty": (dict(json={"prompt": [1], "presence_penalty": 0.5}), 400, "presence_penalty"),
    "stream_options without stream": (dict(json={"prompt": [1], "stream_options": {"include_usage": True}}),
                                      400, "stream_options"),
    "unknown model": (dict(json={"prompt": [1], "model": "gpt-5"}), 404, "model"),
    "malformed JSON": (dict(content=b'{"prompt": [1,', headers={**AUTH, "content-type": "application/json"}),
                       400, None),
    "body too big": (dict(json={"prompt": [1] * 6000}), 413, None),
    "chunked body too big": (dict(content=_big_chunked_body), 413, None),
    "missing API key": (dict(json={"prompt": [1]}, headers={}), 401, None),
    "bad API key": (dict(json={"prompt": [1]}, headers={"Authorization": "Bearer nope"}), 401, None),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_is_openai_shaped_and_server_keeps_serving(tiny_server, case):
    kwargs, status, param = ERROR_CASES[case]
    kwargs = {"headers": AUTH, **kwargs}
    if callable(kwargs.get("content")):
        kwargs["content"] = kwargs["content"]()  # a fresh generator per run: sent chunked
    resp = httpx.post(tiny_server.base_url + "/v1/completions", **kwargs)
    assert_openai_error(resp, status, param)
    ok = httpx.post(tiny_server.base_url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3},
                    headers=AUTH)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_raises_typed_errors(tiny_client, tiny_server):
    with pytest.raises(openai.NotFoundError) as e:
        tiny_client.completions.create(model="nope", prompt=[1, 2], max_tokens=2)
    assert "does not exist" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        tiny_client.completions.create(model="tiny", prompt=[1, 2], max_tokens=2, top_p=0)
    assert e.value.body["param"] == "top_p"
    bad = openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt=[1, 2], max_tokens=2)
    assert httpx.get(tiny_server.base_url + "/metrics").status_code == 200  # unguarded, like vLLM


@contextlib.contextmanager
def gated(llm: LLM) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Hold the engine thread at its next step until `release` is set; `entered` says it got there."""
    entered, release, real_step = threading.Event(), threading.Event(), llm.engine.step

    def step(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real_step(*args, **kwargs)
    llm.engine.step = step
    try:
        yield entered, release
    finally:
        release.set()
        llm.engine.step = real_step


def test_queue_full_is_503_and_clears(tiny_path):
    llm = tiny_llm(tiny_path)
    with serving(llm, max_waiting_requests=1) as server, gated(llm) as (entered, release):
        url = server.base_url + "/v1/completions"
        body = {"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True, "stream": True, "return_token_ids": True}
        with httpx.stream("POST", url, json=body) as first:  # admitted; no token while the engine is held
            assert first.status_code == 200 and entered.wait(10)
            assert_openai_error(httpx.post(url, json={"prompt": [4, 5]}), 503)
            release.set()
            ids = [t for line in first.iter_lines() if line.startswith("data: {")
                   for t in json.loads(line[6:])["choices"][0]["token_ids"]]
        assert len(ids) == 4
        assert httpx.post(url, json={"prompt": [4, 5], "max_tokens": 2}).status_code == 200


def test_engine_failure_is_500_and_loop_keeps_serving(tiny_path, tiny_ref):
    llm = tiny_llm(tiny_path)
    with serving(llm) as server:
        real_step, calls = llm.engine.step, []

        def failing_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected fault")
            return real_step(*args, **kwargs)
        llm.engine.step = failing_once
        url = server.base_url + "/v1/completions"
        err = assert_openai_error(httpx.post(url, json={"prompt": [1, 2, 3], "max_tokens": 4}), 500)
        assert "injected fault" in err["message"]
        prompt = random_prompts([7], seed=4)[0]
        ok = httpx.post(url, json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                   "return_token_ids": True})
        assert ok.json()["choices"][0]["token_ids"] == \
            tiny_ref.generate([prompt], greedy(5), use_tqdm=False)[0].outputs[0].token_ids
        m = wait_idle(server)
        assert metric(m, "kvtier_num_held_blocks_gpu") == 0
        assert metric(m, "kvtier_request_success_total", finished_reason="error") == 1


def test_stream_reports_engine_failure_then_done(tiny_path):
    llm = tiny_llm(tiny_path)
    with serving(llm) as server:
        def broken(*args, **kwargs):
            raise RuntimeError("injected fault")
        llm.engine.step = broken
        body = {"prompt": [1, 2, 3], "max_tokens": 4, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "injected fault" in json.loads(events[-2])["error"]["message"]
        assert httpx.get(server.base_url + "/health").status_code == 200


def test_non_streaming_disconnect_aborts_and_frees_blocks(tiny_path):
    llm = tiny_llm(tiny_path)
    with serving(llm) as server, gated(llm) as (entered, release):
        body = json.dumps({"prompt": list(range(1, 40)), "max_tokens": 80, "ignore_eos": True}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert entered.wait(10)  # the request is in the engine
        sock.close()
        registry = server.app.state.metrics.registry  # read in-process: /metrics would wait for the engine
        deadline = time.monotonic() + 30
        while not registry.get_sample_value("kvtier_request_success_total", {"finished_reason": "abort"}):
            assert time.monotonic() < deadline, "the server never noticed the client leave"
            time.sleep(0.02)
        release.set()
        m = wait_idle(server)
        assert metric(m, "kvtier_request_success_total", finished_reason="abort") == 1
        assert metric(m, "kvtier_generation_tokens_total") < 80
        assert metric(m, "kvtier_num_held_blocks_gpu") == 0


# -- load ---------------------------------------------------------------------------------------

async def _client(http: httpx.AsyncClient, url: str, prompt: list[int], leave_after: int | None) -> list[int] | None:
    """Stream one request; with leave_after, hang up after that many chunks (returns None)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    ids, num_chunks = [], 0
    async with http.stream("POST", url, json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                return ids
            if line.startswith("data: "):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
                num_chunks += 1
                if leave_after is not None and num_chunks == leave_after:
                    return None  # leaving the block closes the connection mid-stream
    raise AssertionError("stream ended without [DONE]")


async def _load(url: str, prompts: list[list[int]], leavers: set[int]) -> list[list[int] | None]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        return await asyncio.gather(*[_client(http, url, p, 3 if i in leavers else None)
                                      for i, p in enumerate(prompts)])


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_load_200_streams_with_disconnects(tiny_path, tiny_ref, async_scheduling):
    prompts = random_prompts([3 + i % 18 for i in range(200)], seed=21)
    leavers = set(range(0, 200, 5))  # 20% hang up after 3 chunks
    with serving(tiny_llm(tiny_path, async_scheduling=async_scheduling)) as server:
        results = asyncio.run(_load(server.base_url + "/v1/completions", prompts, leavers))
        m = wait_idle(server)
    ref = tiny_ref.generate(prompts, greedy(16), use_tqdm=False)
    for i, (got, want) in enumerate(zip(results, ref)):
        assert (got is None) == (i in leavers)
        assert got is None or got == want.outputs[0].token_ids, f"request {i}"
    assert metric(m, "kvtier_num_held_blocks_gpu") == 0
    assert metric(m, "kvtier_num_requests_running") == 0 and metric(m, "kvtier_num_requests_waiting") == 0
    finished = {r: metric(m, "kvtier_request_success_total", finished_reason=r) for r in ("length", "abort")}
    # Every request is counted once; a leaver is an abort unless it finished before its hang-up was seen.
    assert sum(finished.values()) == 200 and finished["length"] >= 160 and finished["abort"] > 0


# -- metrics ------------------------------------------------------------------------------------

def test_metrics_count_what_happened(tiny_path):
    prompts = random_prompts([5, 9, 13, 40], seed=2)
    with serving(tiny_llm(tiny_path)) as server:
        url = server.base_url + "/v1/completions"
        for p in prompts:
            assert httpx.post(url, json={"prompt": p, "max_tokens": 4, "ignore_eos": True}).status_code == 200
        again = httpx.post(url, json={"prompt": prompts[-1], "max_tokens": 4, "ignore_eos": True}).json()
        assert httpx.post(url, json={"prompt": [1], "temperature": -3}).status_code == 400  # counts nothing
        m = wait_idle(server)
    num_requests = len(prompts) + 1
    assert metric(m, "kvtier_prompt_tokens_total") == sum(map(len, prompts)) + 40
    assert metric(m, "kvtier_generation_tokens_total") == 4 * num_requests
    assert metric(m, "kvtier_request_success_total", finished_reason="length") == num_requests
    assert metric(m, "kvtier_time_to_first_token_seconds_count") == num_requests
    assert metric(m, "kvtier_e2e_request_latency_seconds_count") == num_requests
    assert metric(m, "kvtier_inter_token_latency_seconds_count") == 3 * num_requests  # one per later token
    hits = again["usage"]["cached_tokens_by_tier"]["gpu"]
    assert hits == 32 and metric(m, "kvtier_prefix_cache_hits_total", tier="gpu") == hits
    assert metric(m, "kvtier_prefix_cache_queries_total") >= sum(map(len, prompts)) + 40 - 4
    assert metric(m, "kvtier_num_held_blocks_gpu") == 0
    assert metric(m, "kvtier_kv_cache_blocks", tier="gpu") > 0
    for labels in ({"tier": "gpu"}, {"tier": "cpu"}):
        assert ("kvtier_kv_cache_usage_perc", tuple(labels.items())) in m
    for direction in ("to_cpu", "to_gpu"):
        assert ("kvtier_kv_transfer_bytes_total", (("direction", direction),)) in m
        assert ("kvtier_swaps_total", (("direction", direction),)) in m
    assert ("kvtier_num_preemptions_total", ()) in m


# -- the default model: text, chat, stop strings --------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_server() -> Iterator[BackgroundServer]:
    llm = LLM(max_model_len=1024, kv_cache_memory="256MiB", dtype="float32")
    with serving(llm, served_model_names=("smol", "SmolLM2-135M-Instruct")) as server:
        yield server


@pytest.fixture(scope="module")
def smol_client(smol_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key="unused")


def test_chat_equals_offline_streaming_and_not(smol_client, smol_llm):
    ref = smol_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=10, logprobs=2), use_tqdm=False)[0]
    text = ref.outputs[0].text
    assert "Paris" in text
    resp = smol_client.chat.completions.create(model="smol", messages=QUESTION, max_completion_tokens=10,
                                               temperature=0, logprobs=True, top_logprobs=2)
    assert resp.choices[0].message.content == text and resp.choices[0].message.role == "assistant"
    assert resp.model == "smol" and resp.object == "chat.completion"
    content = resp.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(
        [lp[t].logprob for t, lp in zip(ref.outputs[0].token_ids, ref.outputs[0].logprobs)], abs=1e-3)
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)

    chunks = list(smol_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                                      max_tokens=10, temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt ran just before


def test_text_completion_with_stop_strings_streams_what_it_returns(smol_client, smol_llm):
    prompt, stop = "The capital of France is", [" the", "."]
    ref = smol_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=stop), use_tqdm=False)[0]
    resp = smol_client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0, stop=stop)
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == ref.outputs[0].finish_reason
    streamed = smol_client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0,
                                              stop=stop, stream=True, echo=True)
    assert "".join(c.choices[0].text for c in streamed) == prompt + ref.outputs[0].text


def test_tokenize_detokenize(smol_server, smol_llm):
    url = smol_server.base_url
    tok = httpx.post(url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["tokens"] == smol_llm.get_tokenizer().encode("Hello world") and tok["count"] == len(tok["tokens"])
    chat = httpx.post(url + "/tokenize", json={"messages": QUESTION}).json()
    assert chat["tokens"] == smol_llm.apply_chat_template(QUESTION)
    assert httpx.post(url + "/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}
    assert_openai_error(httpx.post(url + "/detokenize", json={"tokens": [10 ** 7]}), 400, "tokens")
    assert_openai_error(httpx.post(url + "/tokenize", json={}), 400, "prompt")


def test_chat_rejects_unsupported_fields(smol_server):
    url = smol_server.base_url + "/v1/chat/completions"
    cases = [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
             ({"top_logprobs": 2}, "top_logprobs"), ({"messages": []}, "messages"),
             ({"response_format": {"type": "json_object"}}, "response_format"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None)]
    for extra, param in cases:
        assert_openai_error(httpx.post(url, json={"messages": QUESTION, "max_tokens": 2, **extra}), 400, param)


def test_stream_holds_back_a_possible_stop_string_start():
    """A stop string can complete in a later output and cut text already produced; the stream must
    never have sent what the final text loses."""
    from kvtier.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from kvtier.server.formats import CompletionFormat

    params = SamplingParams(stop=["XYZ"], max_tokens=8)
    fmt = CompletionFormat("cmpl-1", "m", params, str, False, prompt_index={"r": 0}, echo_texts=None)

    def out(text: str, ids: list[int], finish: str | None) -> RequestOutput:
        comp = CompletionOutput(0, text, ids, finish, "XYZ" if finish else None)
        return RequestOutput("r", None, [1], [comp], finish is not None, RequestMetrics(0.0))

    steps = [out("hello", [1], None), out("hello X", [1, 2], None), out("hello XY", [1, 2, 3], None),
             out("hello ", [1, 2, 3, 4], "stop")]  # "Z" completed the stop string: text cut at "X"
    sent = [c["choices"][0]["text"] for s in steps for c in fmt.chunks(s)]
    assert "".join(sent) == "hello "
    assert sent == ["hel", "lo", " ", ""]  # the last 2 characters wait for the next output
