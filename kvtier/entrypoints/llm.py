"""Offline API in vLLM's shape: `LLM(model=..., **engine_args).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine, PromptType
from kvtier.outputs import RequestOutput
from kvtier.sampling_params import SamplingParams

Messages = list[dict[str, str]]


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, cache_salt: str | None = None) -> list[RequestOutput]:
        """Run prompts (strings, token id lists, or {"prompt_token_ids": ...}) to completion.

        All prompts are validated before any runs, so a bad one changes nothing."""
        prompts = _as_list(prompts)
        params = _params_list(sampling_params, len(prompts))
        processed = [self.engine.process_prompt(p) for p in prompts]  # validate everything first
        for sp in params:
            self.engine.check_sampling_params(sp)
        ids = [self.engine.add_request({"prompt": text, "prompt_token_ids": ids}, sp, cache_salt=cache_salt)
               for (text, ids), sp in zip(processed, params)]
        return self._run(ids, use_tqdm)

    def chat(self, messages: Messages | list[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate() with a prompt")
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                      tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def reset_prefix_cache(self) -> int:
        """vLLM's LLM.reset_prefix_cache: the GPU prefix cache forgets every block no request holds
        (returns how many); the CPU tier keeps its blocks, so the next request with a cached
        prefix loads it from there. Safe between or during generate calls."""
        return self.engine.reset_prefix_cache()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm, leave=False)
        try:
            while len(done) < len(ids):
                for out in self.engine.step(final_only=True):
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update()
        except BaseException:
            self.engine.abort_request(list(wanted - set(done)))
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]


def _as_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):  # one prompt given as token ids
        return [prompts]
    return prompts


def _params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
