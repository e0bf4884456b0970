"""Request bodies of the OpenAI-compatible API, with vLLM's field names, and their SamplingParams.

Unknown fields are refused (400), never silently ignored. Fields OpenAI defines but kvtier cannot
honour (penalties other than repetition_penalty, logit_bias, tools, ...) are accepted only at their
no-op values; anything else is a 400 that says what to use instead.

Each field is checked once: its type and what JSON alone can get wrong (lone surrogates, NaN, Infinity)
here; sampling ranges in SamplingParams; ids against the vocabulary in LLMEngine.check_sampling_params.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from kvtier.sampling_params import SamplingParamError, SamplingParams
from kvtier.server.errors import LONE_SURROGATE, UNSUPPORTED_CONTENT, APIError

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


def _valid_unicode(text: str) -> str:
    """JSON's "\\ud800" escape decodes to a lone surrogate, which no tokenizer and no UTF-8 encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError(LONE_SURROGATE, "contains a lone surrogate {char}, which is not valid Unicode; "
                                  "send valid UTF-8 text", {"char": f"U+{ord(text[e.start]):04X}"}) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]  # every str of a request body is one of these


class _Strict(BaseModel):
    # Python's json reads NaN and Infinity; no float field means anything with them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the usage of the whole request
    continuous_usage_stats: bool = False  # vLLM: usage so far in every chunk


class GenerationRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: Text | None = None
    max_tokens: int | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    ignore_eos: bool = False
    min_tokens: int = 0
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    cache_salt: Text | None = Field(None, description="keeps one tenant's prefix cache from serving another")
    return_token_ids: bool = False  # vLLM: add prompt_token_ids and token_ids to each choice

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported by kvtier; use repetition_penalty "
                               "(> 1 discourages repeats)", name, "unsupported_value")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by kvtier", "logit_bias", "unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        check: Callable[[SamplingParams], None]) -> SamplingParams:
        """Raises APIError(400) naming the bad parameter; `check` adds the engine's checks (the vocabulary)."""
        optional = {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p),
                                      ("top_k", self.top_k), ("min_p", self.min_p),
                                      ("repetition_penalty", self.repetition_penalty)) if v is not None}
        try:
            params = SamplingParams(
                n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
                max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens, **optional)
            check(params)
            return params
        except SamplingParamError as e:
            name = self.api_name(e.name)
            raise APIError(400, f"invalid {name}={e.value!r}: {e.rule}", name, "invalid_value") from e

    def api_name(self, name: str) -> str:
        """The request field that set SamplingParams' field `name`."""
        return name


class CompletionRequest(GenerationRequest):
    # One prompt as text or token ids, or a batch of either.
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: Text | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported by kvtier", "best_of", "unsupported_value")
        if self.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by kvtier", "suffix",
                           "unsupported_value")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo with logprobs needs prompt logprobs, which kvtier does not compute; "
                           "drop one of them", "echo", "unsupported_value")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty; give a string, token ids, or a list of either", "prompt")
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


_MEDIA = {"image_url": "image", "input_audio": "audio", "video_url": "video", "file": "file"}


def _text_only(part: Any) -> Any:
    """Name the modality kvtier lacks, rather than pydantic's "Input should be 'text'"."""
    kind = part.get("type") if isinstance(part, dict) else None
    if isinstance(kind, str) and kind != "text":
        what = f"{_MEDIA[kind]} inputs are" if kind in _MEDIA else f"content parts of type {kind!r} are"
        raise PydanticCustomError(UNSUPPORTED_CONTENT, "{what} not supported by kvtier; send text parts only",
                                  {"what": what})
    return part


class ChatMessage(_Strict):
    role: Text
    content: Text | list[Annotated[TextPart, BeforeValidator(_text_only)]] | None = None
    name: Text | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else \
            "".join(part.text for part in self.content or [])
        out = {"role": self.role, "content": content}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools or self.tool_choice not in (None, "none"):
            raise APIError(400, "tool calling is not supported by kvtier", "tools", "unsupported_value")
        if self.response_format and self.response_format.get("type") != "text":
            raise APIError(400, "structured output (response_format other than text) is not supported "
                           "by kvtier", "response_format", "unsupported_value")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def api_name(self, name: str) -> str:
        return {"logprobs": "top_logprobs", "max_tokens": self.requested_max_tokens[1]}.get(name, name)


class TokenizeRequest(_Strict):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: Text | None = None
    tokens: list[int]
