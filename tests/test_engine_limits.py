"""Limits the engine derives: lowered with a WARNING when the user did not set them, an error that says
what to change when a limit the user set cannot be met."""

from __future__ import annotations

import logging

import pytest

from kvtier import LLM
from kvtier.cache.storage import StorageSpec, Tier
from kvtier.cli import build_parser
from kvtier.config import ConfigError
from kvtier.models.loader import model_config, resolve_model

TINY = model_config(resolve_model("tiny-llama", "dummy"))
BLOCK_BYTES = StorageSpec.for_model(TINY, Tier.GPU, 16, "float32").bytes_per_block
MODEL_MAX = TINY.max_position_embeddings


def _llm(tiny_model_dir, **kwargs) -> LLM:
    path, _ = tiny_model_dir("tiny-llama")
    return LLM(str(path), skip_tokenizer_init=True, dtype="float32", device="cpu", **kwargs)


def _limit_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("kvtier") and r.levelno >= logging.WARNING
            and "max_model_len" in r.getMessage()]


def test_a_kv_cache_too_small_lowers_max_model_len_with_a_warning(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        llm = _llm(tiny_model_dir, kv_cache_memory=5 * BLOCK_BYTES)
    assert llm.engine.max_model_len == 5 * 16
    [record] = _limit_warnings(caplog)
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert f"max_model_len lowered from the model's {MODEL_MAX} to 80 tokens" in message
    assert "--kv-cache-memory" in message and "--max-model-len 80" in message  # what to change


def test_a_max_model_len_set_and_met_gives_no_warning(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        assert _llm(tiny_model_dir, kv_cache_memory=5 * BLOCK_BYTES, max_model_len=64).engine.max_model_len == 64
        assert _llm(tiny_model_dir).engine.max_model_len == MODEL_MAX  # the default budget holds it
    assert not _limit_warnings(caplog)


@pytest.mark.parametrize("kwargs, message", [
    ({"kv_cache_memory": 5 * BLOCK_BYTES, "max_model_len": 512},
     r"max_model_len=512 does not fit the KV cache \(80 tokens in 5 blocks of 16\); lower --max-model-len to "
     r"at most 80, or give the cache at least 1MiB \(--kv-cache-memory\)"),
    ({"max_model_len": MODEL_MAX + 1}, rf"exceeds the model's {MODEL_MAX} positions; lower --max-model-len to "
                                       rf"at most {MODEL_MAX}"),
    ({"kv_cache_memory": BLOCK_BYTES - 1}, rf"holds no block of {BLOCK_BYTES} bytes; give --kv-cache-memory at "
                                           r"least 1MiB"),
])
def test_a_limit_the_user_set_that_cannot_be_met_is_an_error(tiny_model_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _llm(tiny_model_dir, **kwargs)


def test_the_cli_shows_warnings_by_default():
    assert build_parser().parse_args(["generate"]).log_level == "WARNING"
