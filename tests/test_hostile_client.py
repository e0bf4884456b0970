"""A hostile client against a live `kvtier serve` on the default model: every malformed request gets a 4xx
with an OpenAI-shaped error (non-null `code`, the field at fault as `param`), and a greedy request
afterwards answers the same text as before any of them (4 tokens after each case, to keep the module
fast on two cores; the whole answer once more at the end).

Bodies are sent as bytes from `json.dumps`, which writes NaN and Infinity and escapes lone surrogates
(`\\ud800`), as a client in another language may; httpx's `json=` refuses both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import httpx2 as httpx
import pytest

from conftest import LiveServer
from kvtier.sampling_params import MAX_N, SamplingParamError, SamplingParams

KEY = "hostile-key"
JSON = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {KEY}", **JSON}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = {"messages": QUESTION, "max_tokens": 8, "temperature": 0}
SHORT_ANSWER = {**ANSWER, "max_tokens": 4}
VOCAB = 49152  # SmolLM2's
MAX_MODEL_LEN = 512


class Case(NamedTuple):
    body: dict[str, Any] | bytes  # a dict goes through json.dumps; bytes are sent as they are
    param: str | None = None  # the `param` the error must name (None: no single field is at fault)
    status: int = 400
    path: str = "/v1/chat/completions"
    headers: dict[str, str] = AUTH
    method: str = "POST"
    code: str | None = None  # the `code` when the case is about it; any non-null one otherwise


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": QUESTION, "max_tokens": 4, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "The capital of France is", "max_tokens": 4, **fields}


def message(content: Any, role: Any = "user") -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content}], "max_tokens": 4}


SURROGATE = "hi \ud800 there"
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}

RANGES = {  # crash reproductions from issue 10, and integers past what the engine takes
    "seed 2**64": Case(chat(seed=2**64), "seed"),
    "seed 2**64-1 with n=2": Case(chat(seed=2**64 - 1, n=2, temperature=1.0), "seed"),
    "seed below -2**63": Case(chat(seed=-2**63 - 1), "seed"),
    "stop_token_ids past the vocabulary with min_tokens": Case(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "min_tokens": 2,
         "stop_token_ids": [1000000000]}, "stop_token_ids"),
    "stop_token_ids equal to the vocabulary size": Case(completion(stop_token_ids=[VOCAB]), "stop_token_ids",
                                                        path="/v1/completions"),
    "negative stop_token_ids": Case(chat(stop_token_ids=[-1]), "stop_token_ids"),
    "stop_token_ids of strings": Case(chat(stop_token_ids=["eos"]), "stop_token_ids.0"),
    "n huge": Case(chat(n=10**9), "n"),
    "n zero": Case(chat(n=0), "n"),
    "n just over the limit": Case(chat(n=129), "n"),
    "max_tokens past any context": Case(chat(max_tokens=10**30), "max_tokens", code="context_length_exceeded"),
    "max_tokens zero": Case(chat(max_tokens=0), "max_tokens"),
    "max_tokens negative": Case(completion(max_tokens=-1), "max_tokens", path="/v1/completions"),
    "max_completion_tokens huge": Case(chat(max_completion_tokens=10**12), "max_completion_tokens"),
    "max_completion_tokens zero": Case(chat(max_completion_tokens=0), "max_completion_tokens"),
    "min_tokens huge": Case(chat(min_tokens=10**20), "min_tokens"),
    "min_tokens negative": Case(chat(min_tokens=-1), "min_tokens"),
    "top_k negative": Case(chat(top_k=-5), "top_k"),
    "completion logprobs 21": Case(completion(logprobs=21), "logprobs", path="/v1/completions"),
    "completion logprobs negative": Case(completion(logprobs=-1), "logprobs", path="/v1/completions"),
    "chat top_logprobs 21": Case(chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    "chat top_logprobs negative": Case(chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    "chat top_logprobs without logprobs": Case(chat(top_logprobs=2), "top_logprobs"),
}

FLOATS = {  # Python's json reads NaN and Infinity; none of them is a usable value
    "temperature Infinity": Case(chat(temperature=float("inf")), "temperature"),
    "temperature NaN": Case(chat(temperature=float("nan")), "temperature"),
    "temperature -Infinity": Case(completion(temperature=float("-inf")), "temperature", path="/v1/completions"),
    "temperature 1e999 (parses to inf)": Case(b'{"prompt": "Hi", "temperature": 1e999}', "temperature",
                                              path="/v1/completions"),
    "temperature 1e300": Case(chat(temperature=1e300), "temperature"),
    "temperature negative": Case(chat(temperature=-0.5), "temperature"),
    "top_p NaN": Case(chat(top_p=float("nan")), "top_p"),
    "top_p zero": Case(chat(top_p=0), "top_p"),
    "top_p over 1": Case(chat(top_p=1.5), "top_p"),
    "min_p Infinity": Case(chat(min_p=float("inf")), "min_p"),
    "min_p negative": Case(chat(min_p=-0.1), "min_p"),
    "repetition_penalty 1e-300": Case(chat(repetition_penalty=1e-300), "repetition_penalty"),
    "repetition_penalty Infinity": Case(chat(repetition_penalty=float("inf")), "repetition_penalty"),
    "repetition_penalty zero": Case(chat(repetition_penalty=0), "repetition_penalty"),
    "repetition_penalty 1000": Case(chat(repetition_penalty=1000), "repetition_penalty"),
    "presence_penalty NaN": Case(chat(presence_penalty=float("nan")), "presence_penalty"),
}

UNICODE = {  # lone surrogates anywhere text goes, and bodies that are not UTF-8
    "lone surrogate in a completion prompt": Case(completion(prompt=SURROGATE), "prompt", path="/v1/completions"),
    "lone surrogate in a batch of prompts": Case(completion(prompt=["fine", SURROGATE]), "prompt.1",
                                                 path="/v1/completions"),
    "lone surrogate in chat content": Case(message(SURROGATE), "messages.0.content"),
    "lone surrogate in a text part": Case(message([{"type": "text", "text": SURROGATE}]),
                                          "messages.0.content.0.text"),
    "lone surrogate in a role": Case(message("Hi", role="user\udfff"), "messages.0.role"),
    "lone surrogate in a stop string": Case(chat(stop=["ok", "\ud83d"]), "stop.1"),
    "lone surrogate in /tokenize prompt": Case({"prompt": SURROGATE}, "prompt", path="/tokenize"),
    "lone surrogate in /tokenize messages": Case({"messages": [{"role": "user", "content": SURROGATE}]},
                                                 "messages.0.content", path="/tokenize"),
    "lone surrogate in the model name": Case(chat(model="smol\ud800"), "model"),
    "lone surrogate in a field name": Case(chat(**{"\ud800": 1}), None),
    "body not UTF-8": Case(b'{"prompt": "caf\xe9 \xff\xfe", "max_tokens": 2}', None, path="/v1/completions",
                           code="invalid_json"),
}

CONTENT = {  # chat content kvtier cannot take: media parts, and malformed messages
    "image_url part": Case(message([IMAGE]), "messages.0.content.0", code="unsupported_value"),
    "input_audio part": Case(message([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]),
                             "messages.0.content.0", code="unsupported_value"),
    "text then image part": Case(message([{"type": "text", "text": "What is this?"}, IMAGE]),
                                 "messages.0.content.1", code="unsupported_value"),
    "part of an unknown type": Case(message([{"type": "hologram"}]), "messages.0.content.0",
                                    code="unsupported_value"),
    "text part with a number": Case(message([{"type": "text", "text": 3}]), "messages.0.content.0.text"),
    "text part with an extra field": Case(message([{"type": "text", "text": "Hi", "cache": 1}]),
                                          "messages.0.content.0.cache", code="unknown_parameter"),
    "message without a role": Case({"messages": [{"content": "Hi"}]}, "messages.0.role",
                                   code="missing_required_parameter"),
    "no messages": Case(chat(messages=[]), "messages"),
    "messages not a list": Case(chat(messages="Hi"), "messages"),
}

BODIES = {  # not a JSON object, or not JSON at all
    "malformed JSON": Case(b'{"messages": [', None, code="invalid_json"),
    "empty body": Case(b"", None),
    "JSON array": Case(b"[1, 2]", None),
    "JSON string": Case(b'"What is the capital of France?"', None),
    "nested too deeply": Case(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None,
                              path="/v1/completions", code="invalid_json"),
    "integer of 5000 digits": Case(b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}", None,
                                   path="/v1/completions", code="invalid_json"),
    "text/plain body": Case(json.dumps(chat()).encode(), None, headers={**AUTH, "Content-Type": "text/plain"}),
    "no content type": Case(json.dumps(chat()).encode(), None, headers={"Authorization": f"Bearer {KEY}"}),
}

FIELDS = {  # wrong types, unknown and unsupported fields
    "temperature a string": Case(chat(temperature="hot"), "temperature", code="invalid_type"),
    "max_tokens fractional": Case(chat(max_tokens=5.5), "max_tokens", code="invalid_type"),
    "n a string": Case(chat(n="many"), "n"),
    "stream not a boolean": Case(chat(stream="yes please"), "stream"),
    "prompt of floats": Case(completion(prompt=[1.5]), "prompt", path="/v1/completions"),
    "prompt an object": Case(completion(prompt={"text": "Hi"}), "prompt", path="/v1/completions"),
    "empty stop string": Case(chat(stop=[""]), "stop"),
    "unknown field": Case(chat(frobnicate=True), "frobnicate", code="unknown_parameter"),
    "unknown stream_options field": Case(chat(stream=True, stream_options={"every": 1}), "stream_options.every"),
    "logit_bias": Case(chat(logit_bias={"50256": -100}), "logit_bias", code="unsupported_value"),
    "tools": Case(chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    "response_format json": Case(chat(response_format={"type": "json_object"}), "response_format"),
    "best_of over n": Case(completion(best_of=2), "best_of", path="/v1/completions"),
    "suffix": Case(completion(suffix="end"), "suffix", path="/v1/completions"),
    "echo with logprobs": Case(completion(echo=True, logprobs=1), "echo", path="/v1/completions"),
    "stream_options without stream": Case(chat(stream_options={"include_usage": True}), "stream_options"),
    "empty prompt list": Case(completion(prompt=[]), "prompt", path="/v1/completions"),
    "prompt token id past the vocabulary": Case(completion(prompt=[1, VOCAB]), "prompt", path="/v1/completions"),
    "prompt longer than the model": Case(completion(prompt=[1] * MAX_MODEL_LEN), "prompt",
                                         path="/v1/completions"),
    "detokenize a negative id": Case({"tokens": [-1]}, "tokens", path="/detokenize"),
    "detokenize a string": Case({"tokens": "abc"}, "tokens", path="/detokenize"),
    "tokenize both prompt and messages": Case({"prompt": "Hi", "messages": QUESTION}, "prompt", path="/tokenize"),
}

ROUTES = {  # unknown routes, methods, models, and the API key
    "unknown route": Case(chat(), None, 404, "/v1/embeddings", code="not_found"),
    "GET on a POST route": Case(b"", None, 405, method="GET", code="method_not_allowed"),
    "unknown model": Case(chat(model="gpt-5"), "model", 404),
    "no key": Case(chat(), None, 401, headers=JSON, code="invalid_api_key"),
    "wrong key": Case(chat(), None, 401, headers={**JSON, "Authorization": "Bearer nope"}),
    "key with the Basic scheme": Case(chat(), None, 401, headers={**JSON, "Authorization": f"Basic {KEY}"}),
    "Bearer with no key": Case(chat(), None, 401, headers={**JSON, "Authorization": "Bearer"}),
    "key with a suffix": Case(chat(), None, 401, headers={**JSON, "Authorization": f"Bearer {KEY}x"}),
    "/tokenize without the key": Case({"prompt": "Hi"}, None, 401, "/tokenize", headers=JSON),
    "/detokenize without the key": Case({"tokens": [1, 2]}, None, 401, "/detokenize", headers=JSON),
    "/v1/models without the key": Case(b"", None, 401, "/v1/models", headers=JSON, method="GET"),
}

CASES = {**RANGES, **FLOATS, **UNICODE, **CONTENT, **BODIES, **FIELDS, **ROUTES}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[httpx.Client]:
    live = LiveServer("--device", "cpu", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
                      "--kv-cache-memory", "64MiB", "--api-key", KEY, log_dir=tmp_path_factory.mktemp("serve"))
    try:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            yield client
    finally:
        live.stop()


def answer(server: httpx.Client, body: dict[str, Any] = SHORT_ANSWER, headers: dict[str, str] = AUTH) -> str:
    resp = server.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def baseline(server) -> dict[str, str]:
    """The answers before any hostile request."""
    full = answer(server, ANSWER)
    assert "Paris" in full
    return {"full": full, "short": answer(server)}


def send(server: httpx.Client, case: Case) -> httpx.Response:
    content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    return server.request(case.method, case.path, content=content, headers=case.headers)


def test_enough_distinct_cases():
    assert len({repr(case) for case in CASES.values()}) == len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_request_is_refused_clearly_and_harms_nothing(server, baseline, name):
    case = CASES[name]
    resp = send(server, case)
    assert resp.status_code == case.status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == case.param, error
    assert error["code"] is not None and (case.code is None or error["code"] == case.code), error
    assert isinstance(error["message"], str) and len(error["message"]) > 15, error
    assert answer(server) == baseline["short"]


def test_error_messages_say_what_to_change(server):
    """The messages issue 10 found unreadable."""
    def message_of(case: Case) -> str:
        return send(server, case).json()["error"]["message"]
    assert "lone surrogate U+D800" in message_of(UNICODE["lone surrogate in a completion prompt"])
    assert "image inputs are not supported by kvtier; send text parts only" in message_of(CONTENT["image_url part"])
    assert "not valid UTF-8" in message_of(UNICODE["body not UTF-8"])
    assert message_of(RANGES["chat top_logprobs 21"]).startswith("top_logprobs")
    assert "Bearer" in message_of(ROUTES["key with the Basic scheme"])


def test_bearer_scheme_is_case_insensitive(server, baseline):
    """RFC 7235: the scheme is case-insensitive. Runs after the hostile cases: the whole answer is unchanged."""
    assert answer(server, ANSWER, {"Authorization": f"bearer {KEY}"}) == baseline["full"]
    assert answer(server, headers={"Authorization": f"BEARER {KEY}"}) == baseline["short"]


def test_tokenize_with_the_key_and_open_routes_without(server):
    assert server.post("/tokenize", json={"prompt": "Hi"}, headers=AUTH).json()["count"] >= 1
    for path in ("/health", "/metrics", "/version"):
        assert server.get(path).status_code == 200, path


def test_every_seed_in_range_runs_with_its_children(server):
    """The largest and smallest int64 seeds with n=3: the children's seeds wrap, none overflows."""
    for seed in (2**63 - 1, -2**63):
        resp = server.post("/v1/chat/completions", json=chat(seed=seed, n=3, temperature=1.0, max_tokens=2),
                           headers=AUTH)
        assert resp.status_code == 200 and len(resp.json()["choices"]) == 3, resp.text


def test_sampling_params_refuse_what_the_engine_cannot_run():
    """The offline API has the same ranges; the children of the extreme seeds stay in int64, distinct."""
    nan, inf = float("nan"), float("inf")
    for kwargs in ({"temperature": nan}, {"temperature": inf}, {"top_p": nan}, {"min_p": nan},
                   {"repetition_penalty": nan}, {"repetition_penalty": 1e-300}, {"seed": 2**63},
                   {"n": MAX_N + 1}, {"stop_token_ids": [-1]}):
        with pytest.raises(SamplingParamError) as e:
            SamplingParams(**kwargs)
        assert e.value.name == next(iter(kwargs))
    assert [SamplingParams(seed=2**63 - 2, n=3).child(i).seed for i in range(3)] == [2**63 - 2, 2**63 - 1, -2**63]
