"""OpenAI-compatible HTTP server (`kvtier serve`).

- api_server: the FastAPI app, its routes, and running it (foreground or a background thread)
- serving: the endpoints' logic: checks, engine requests, JSON or SSE answers
- protocol: request bodies (vLLM's field names) and their SamplingParams
- formats: RequestOutputs as OpenAI responses, stream chunks, usage, logprobs
- async_engine: the LLMEngine on its own thread, fed and drained from the event loop
- metrics: the per-server Prometheus registry
- middleware, errors: API key, body size limit, OpenAI-shaped errors
"""

from kvtier.server.api_server import BackgroundServer, create_app, serve
from kvtier.server.serving import ServerConfig

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "serve"]
