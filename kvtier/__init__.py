"""kvtier: an LLM inference engine whose paged KV cache spans GPU and CPU memory."""

from kvtier.config import EngineConfig
from kvtier.entrypoints.llm import LLM
from kvtier.outputs import CompletionOutput, RequestOutput
from kvtier.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
