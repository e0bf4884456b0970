"""The FastAPI app of `kvtier serve` and the ways to run it (foreground, or a background thread).

Routes: /v1/completions, /v1/chat/completions, /v1/models (OpenAI); /health, /tokenize,
/detokenize, /metrics, /version (vLLM's extras). /health and /metrics answer from the stats the
engine thread publishes after each step, never by waiting for one.

Shutdown (SIGTERM, Ctrl-C): stop accepting, give running requests --shutdown-timeout seconds,
then end them with an error event (streams) or a 503, and exit 0.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

import kvtier
from kvtier.entrypoints.llm import LLM
from kvtier.server.async_engine import AsyncEngine
from kvtier.server.errors import error_response, install_error_handlers
from kvtier.server.metrics import ServerMetrics
from kvtier.server.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from kvtier.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from kvtier.server.serving import OpenAIServing, ServerConfig


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    """An app around `llm`'s engine; the engine thread runs from the app's startup to its shutdown."""
    metrics = ServerMetrics()
    engine = AsyncEngine(llm.engine, metrics, config.max_waiting_requests)
    serving = OpenAIServing(llm, engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="kvtier", version=kvtier.__version__, lifespan=lifespan)
    app.state.serving, app.state.engine, app.state.metrics = serving, engine, metrics
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=config.max_body_bytes)
    if config.api_key:  # added last = outermost: a request without the key never has its body read
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    _add_openai_routes(app, serving)
    _add_extra_routes(app, serving, engine, metrics)
    return app


def _add_openai_routes(app: FastAPI, serving: OpenAIServing) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await serving.completions(body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(body, raw)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "kvtier", "root": name,
             "parent": None, "max_model_len": serving.max_model_len}
            for name in serving.config.served_model_names]}


def _add_extra_routes(app: FastAPI, serving: OpenAIServing, engine: AsyncEngine, metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return error_response(503, "the engine loop is not running", code="engine_dead")
        if engine.draining:  # load balancers stop sending here
            return error_response(503, "the server is shutting down", code="server_shutting_down")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": kvtier.__version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        return await serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        return await serving.detokenize(body)

    @app.get("/metrics")
    async def prometheus() -> Response:
        # the snapshot the engine thread published after its last step: consistent, and never waits
        return Response(metrics.render(engine.latest_stats), media_type=CONTENT_TYPE_LATEST)


DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


class GracefulServer(uvicorn.Server):
    """uvicorn's server, which on a shutdown signal also starts the engine's drain: new requests
    are refused at once, running ones get `shutdown_timeout_s` to finish, then end with an error
    event, so uvicorn's own wait for open connections ends within the bound."""

    def __init__(self, app: FastAPI, shutdown_timeout_s: float, **config: Any):
        # uvicorn's own bound is a backstop only: past it, it cuts connections without a word
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout_s + 3, **config))
        self.app, self.shutdown_timeout_s = app, shutdown_timeout_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.begin_drain()

    def begin_drain(self) -> None:
        self.app.state.engine.drain_threadsafe(self.shutdown_timeout_s)


def serve(llm: LLM, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
    """Run in the foreground until SIGTERM or Ctrl-C, then shut down within `shutdown_timeout_s`
    (plus a few seconds) and return normally."""
    server = GracefulServer(create_app(llm, config), shutdown_timeout_s, host=host, port=port,
                            log_level=log_level)
    # uvicorn re-raises the signal that stopped it once it is done, with the handler it found
    # installed; this one makes that a no-op, so a graceful shutdown ends the process with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _already_shut_down)
    server.run()


def _already_shut_down(sig: int, frame: FrameType | None) -> None:
    pass


class BackgroundServer:
    """Serve an app from a thread on a free loopback port, as a context manager (tests, notebooks).

        with BackgroundServer(create_app(llm, config)) as server:
            openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
        self.app, self.host, self.port, self.start_timeout_s = app, host, port, start_timeout_s
        # A bounded graceful shutdown: a stream left open (say by a failed test) must not hang __exit__.
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))  # bound here, so the port is known and cannot be taken meanwhile
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name=f"kvtier-server-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.base_url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
