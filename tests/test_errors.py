"""Bad input gets a clear error naming the value and the limit; the engine keeps serving."""

from __future__ import annotations

import json

import pytest

from conftest import greedy, random_prompts
from kvtier import LLM
from kvtier.config import ConfigError
from kvtier.models.config import UnsupportedModelError


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("tiny-llama")[0]), skip_tokenizer_init=True, dtype="float32", max_model_len=64)


def test_prompt_longer_than_model_len_is_rejected_and_others_still_run(llm):
    engine = llm.engine
    ok = engine.add_request(random_prompts([10])[0], greedy(8))
    with pytest.raises(ValueError, match=r"100 tokens.*max_model_len is 64"):
        engine.add_request(random_prompts([100])[0], greedy(8))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 2, 100000], greedy(8))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], greedy(8))
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == [ok] and len(done[0].outputs[0].token_ids) == 8


def test_generate_validates_all_prompts_before_running(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(random_prompts([5, 200]), greedy(4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_text_prompt_without_tokenizer(llm):
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", greedy(4), use_tqdm=False)


def test_unknown_model_path():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        LLM("/nonexistent/model-dir")


def test_unknown_dummy_config():
    with pytest.raises(ValueError, match="unknown dummy model config 'llama9-1t'"):
        LLM("llama9-1t", load_format="dummy")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))


def test_unknown_engine_option():
    with pytest.raises(ConfigError, match="unknown engine option.*gpu_mem_util"):
        LLM("tiny-llama", load_format="dummy", gpu_mem_util=0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"block_size": 12}, "power of two"), ({"gpu_memory_utilization": 1.5}, r"\(0, 1\]"),
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"kv_cache_memory": "lots"}, "memory size"),
    ({"dtype": "float8"}, "dtype"), ({"max_model_len": 5000}, "1024 positions"),
])
def test_bad_engine_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LLM("tiny-llama", load_format="dummy", **kwargs)


def test_abort_frees_blocks(llm):
    engine = llm.engine
    rid = engine.add_request(random_prompts([40])[0], greedy(30))
    engine.step()
    assert engine.num_held_blocks() > 0
    engine.abort_request(rid)
    engine.check_integrity()
    assert engine.num_held_blocks() == 0 and not engine.has_unfinished_requests()
