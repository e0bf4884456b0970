"""ASGI middleware: the API key check, and the request body size limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed responses and
hide client disconnects from the handlers.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvtier.server.errors import error_response

# Routes anyone may call, as in vLLM: they run no model and read no tokenizer. Every other route, those
# added later included, needs the key (/tokenize and /detokenize run the engine's tokenizer).
OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer KEY`, on every route but OPEN_PATHS."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            refusal = self._refusal(dict(scope["headers"]).get(b"authorization", b""))
            if refusal:
                response = error_response(401, refusal, code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, header: bytes) -> str | None:
        """Why the Authorization header does not carry the key; None when it does."""
        if not header:
            return "missing API key; send `Authorization: Bearer <key>`"
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer":  # auth schemes are case-insensitive (RFC 7235)
            return "the Authorization header must use the Bearer scheme: `Authorization: Bearer <key>`"
        if not hmac.compare_digest(key.strip(b" "), self.expected):  # constant time: no guessing by timing
            return "invalid API key; send the key the server was started with: `Authorization: Bearer <key>`"
        return None


class BodySizeLimitMiddleware:
    """413 for a body over `max_body_bytes`: judged by Content-Length, or for a chunked body (no length)
    by reading it first (at most the limit plus one message) and replaying it to the app."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.limit = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:  # the HTTP server holds the client to it
            if length.isdigit() and int(length) > self.limit:
                await self._refuse(int(length), scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        body, size = await self._read_chunked(receive)
        if size > self.limit:
            await self._refuse(size, scope, receive, send, at_least=True)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_chunked(self, receive: Receive) -> tuple[list[Message], int]:
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, size
            size += len(message.get("body", b""))
            if size > self.limit or not message.get("more_body", False):
                return messages, size

    async def _refuse(self, size: int, scope: Scope, receive: Receive, send: Send, at_least: bool = False) -> None:
        message = (f"the request body has {'at least ' if at_least else ''}{size} bytes, over this server's "
                   f"limit of {self.limit} (--max-body-bytes)")
        await error_response(413, message, code="request_too_large")(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()
    return replayed
