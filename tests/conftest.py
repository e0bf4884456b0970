"""Shared fixtures: tiny random HF models saved as local directories, and HF greedy references."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import warnings
import weakref
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run interpreted on the CPU; must precede any triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_NAMES = ("tiny-llama", "tiny-opt", "tiny-qwen2", "tiny-llama31", "tiny-mistral")

# -- the integrity check of both tiers after every test ------------------------------------------

_ENGINES: weakref.WeakSet = weakref.WeakSet()  # every LLMEngine still alive
_ASYNC_ENGINES: weakref.WeakSet = weakref.WeakSet()  # every server AsyncEngine still alive
_BUILT_IN_TEST: list = []  # kept alive until the test's check: a test's own engines die with its locals


def _recording(init, registry: weakref.WeakSet):
    @functools.wraps(init)
    def init_and_record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        registry.add(self)
        _BUILT_IN_TEST.append(self)
    return init_and_record


@pytest.fixture(scope="session", autouse=True)
def _track_engines():
    """Record each engine as it is built; session-scoped and first, so that the engines of session
    and module fixtures are recorded too."""
    from kvtier.engine.llm_engine import LLMEngine
    patch = pytest.MonkeyPatch()
    patch.setattr(LLMEngine, "__init__", _recording(LLMEngine.__init__, _ENGINES))
    try:  # the GPU machine has no server packages (uvicorn): there only engines are checked
        from kvtier.server.async_engine import AsyncEngine
    except ImportError:
        pass
    else:
        patch.setattr(AsyncEngine, "__init__", _recording(AsyncEngine.__init__, _ASYNC_ENGINES))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _check_engine_integrity(_track_engines):
    """After each test, the block accounting of both tiers of every engine still alive (fixtures'
    engines included). An engine that a running server drives is checked on its engine thread,
    between two steps; any other is idle and is checked here."""
    _BUILT_IN_TEST.clear()  # those of fixtures set up before this test stay alive in their fixtures
    yield
    served = {id(ae.engine): ae for ae in list(_ASYNC_ENGINES) if ae.is_running}
    engines = {id(e): e for e in [*_ENGINES, *_BUILT_IN_TEST] if hasattr(e, "kv_cache")}
    _BUILT_IN_TEST.clear()
    for engine in engines.values():
        try:
            if id(engine) in served:
                _check_on_engine_thread(served[id(engine)])
            else:
                engine.check_integrity()
        except BaseException:
            _ENGINES.discard(engine)  # reported once, by the test that broke it
            raise


def _check_on_engine_thread(async_engine, timeout_s: float = 10.0) -> None:
    done: concurrent.futures.Future = concurrent.futures.Future()

    def check() -> None:
        try:
            async_engine.engine.check_integrity()
            done.set_result(None)
        except BaseException as e:  # re-raised in the test's thread
            done.set_exception(e)
    async_engine._commands.put(check)  # what AsyncEngine.call does, without needing its event loop
    try:
        done.result(timeout_s)
    except concurrent.futures.TimeoutError:  # a step that a test made hang: nothing to check
        warnings.warn(f"engine integrity not checked: its thread was busy for {timeout_s} s", stacklevel=1)


def make_hf_model(name: str, seed: int = 0):
    import transformers

    from kvtier.models.registry import DUMMY_CONFIGS
    cfg_dict = dict(DUMMY_CONFIGS[name])
    cfg = transformers.CONFIG_MAPPING[cfg_dict.pop("model_type")](**cfg_dict)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # Spread the random logits: HF's default init (std 0.02) gives near-uniform distributions
    # whose top-2 gaps are tiny; a larger scale makes greedy decoding well-conditioned.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """name -> (directory with config.json + safetensors, the HF model)"""
    cache: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in cache:
            model = make_hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (path, model)
        return cache[name]
    return get


def random_prompts(lengths, vocab: int = 512, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


MIXED_LENGTHS = (5, 17, 33, 1, 40, 16, 9, 64)


def hf_greedy(model, prompt: list[int], max_new_tokens: int):
    """HF transformers' greedy generate: (token ids, per-step logits (steps, vocab))."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, torch.stack([lg[0] for lg in out.logits]).float()


def assert_greedy_equal(ours: list[int], ref: list[int], ref_logits: torch.Tensor, gap: float = 1e-4):
    """Token-for-token equality; a divergence is allowed only where HF's top-2 logit gap < `gap`."""
    assert len(ours) == len(ref), f"length {len(ours)} != {len(ref)}"
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top2 = ref_logits[i].topk(2).values
            assert (top2[0] - top2[1]).item() < gap, (
                f"token {i}: ours {a} != HF {b} with top-2 gap {(top2[0] - top2[1]).item():.3g}")
            return  # the sequences legitimately diverge from here


def greedy(max_tokens: int = 32, **kw):
    from kvtier import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="session")
def smollm2():
    """Path of the SmolLM2-135M-Instruct GGUF (installed by the Makefile; missing = failure)."""
    from kvtier.models.gguf_loader import default_gguf_path
    return default_gguf_path()


@pytest.fixture(scope="session")
def hf_model(smollm2):
    """HF transformers' own GGUF loading of SmolLM2, fp32: the reference."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)


@pytest.fixture(scope="session")
def smol_llm():
    """kvtier's LLM on the default model (SmolLM2 from the GGUF), fp32 on CPU."""
    from kvtier import LLM
    return LLM(max_model_len=2048, kv_cache_memory="1GiB", dtype="float32")


class BlockTables:
    """Whole block tables rebuilt from the plans' diffs, the way the model runner keeps them."""

    def __init__(self):
        self.tables: dict[str, list[int]] = {}

    def apply(self, plan) -> dict[str, list[int]]:
        """Apply one plan's diffs; the tables of the requests it schedules, by request id."""
        for request_id in plan.finished_request_ids + plan.preempted_request_ids:
            self.tables.pop(request_id, None)
        for s in plan.scheduled:
            kept = [] if s.reset_block_table else self.tables[s.request_id]
            self.tables[s.request_id] = kept + list(s.new_block_ids)
        return {s.request_id: list(self.tables[s.request_id]) for s in plan.scheduled}


class LiveServer:
    """`python -m kvtier.cli serve ARGS` on a free loopback port, its output in a log file (a pipe
    nobody reads could fill and stall the server); started once /health answers 200."""

    def __init__(self, *args: str, log_dir: Path, timeout_s: float = 180.0):
        import socket
        import subprocess
        import sys
        import time

        import httpx2 as httpx
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{port}", log_dir / f"serve-{port}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", *args, "--port", str(port),
                                          "--uvicorn-log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not _answers(httpx, self.url + "/health"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"kvtier serve did not start:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, timeout_s: float = 40.0) -> None:
        import subprocess
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _answers(httpx, url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
