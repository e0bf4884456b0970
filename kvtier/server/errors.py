"""OpenAI-shaped errors ({"error": {"message", "type", "param", "code"}}) and the handlers that make them.

Every failure the server answers, FastAPI's own validation included, goes through `error_response`,
so a client sees one shape whatever went wrong, always with a `code`.
"""

from __future__ import annotations

import http
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# OpenAI's error type by status, and the `code` (a short machine-readable reason) when none is given.
_KINDS = {400: ("invalid_request_error", "invalid_value"), 401: ("authentication_error", "invalid_api_key"),
          404: ("invalid_request_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed"),
          413: ("invalid_request_error", "request_too_large"),
          499: ("invalid_request_error", "client_closed_request"),
          500: ("server_error", "internal_error"), 503: ("server_error", "service_unavailable")}

# Pydantic error types raised by protocol.py's own validators. Each says exactly what to change, so it wins
# over the type errors of a union's other members ("a valid list", "a valid integer", ...).
LONE_SURROGATE, UNSUPPORTED_CONTENT = "lone_surrogate", "unsupported_content"
_OWN_CODES = {LONE_SURROGATE: "invalid_value", UNSUPPORTED_CONTENT: "unsupported_value"}


class APIError(Exception):
    """A request the server refuses; raised anywhere in a handler, answered as an OpenAI error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind, default_code = _KINDS.get(status, ("invalid_request_error", "invalid_request"))
    return {"error": {"message": _utf8_safe(message), "type": kind,
                      "param": None if param is None else _utf8_safe(param), "code": code or default_code}}


def _utf8_safe(text: str) -> str:
    """A lone surrogate from the request (an unknown field's name, say) would fail encoding the answer."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """Pydantic's errors as (message, param, code): one sentence per top-level field; `param` and `code`
    are those of the first field at fault."""
    by_field: dict[str, list[dict[str, Any]]] = {}
    for err in errors:
        if err.get("type") == "json_invalid":
            where = f" at character {err['loc'][-1]}" if isinstance(err["loc"][-1], int) else ""
            return (f"the request body is not valid JSON ({err.get('ctx', {}).get('error', '')}{where})", None,
                    "invalid_json")
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        by_field.setdefault(loc[0] if loc else "", []).append({**err, "loc": loc})
    described = [_describe(field, errs) for field, errs in by_field.items()]
    return "; ".join(message for message, _, _ in described), described[0][1], described[0][2]


def _describe(field: str, errs: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    errs = _most_specific(errs)
    first = errs[0]
    path = _path(first["loc"])
    if not field:
        return _describe_body(first)
    if first["type"] == "extra_forbidden":
        return f"unknown field {path!r}: kvtier does not support it; remove it", path, "unknown_parameter"
    members = list(dict.fromkeys(m for m in map(_union_member, errs) if m))
    if len(members) > 1:  # every member of a union refused the value: say what would be accepted
        union = _path(first["loc"][:_union_at(first["loc"])])
        return f"{union}: {_short(first.get('input'))} is none of the accepted types ({', '.join(members)})", \
            union, "invalid_type"
    got = "" if first["type"] == "missing" else f" (got {_short(first.get('input'))})"
    return f"{path}: {first['msg']}{got}", path, _OWN_CODES.get(first["type"]) or _code_of(first["type"])


def _describe_body(err: dict[str, Any]) -> tuple[str, None, str]:
    """An error of the body as a whole."""
    if err["type"] == "missing":
        return "the request needs a JSON body", None, "missing_required_parameter"
    if err["type"] == "string_unicode":  # pydantic cannot read a field name: a lone surrogate
        return (f"a field name in the request body ({_short(err.get('input'))}) is not valid Unicode (a lone "
                "surrogate); send valid UTF-8 text", None, "invalid_value")
    return "the request body must be a JSON object sent with Content-Type: application/json", None, "invalid_type"


def _most_specific(errs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The errors of kvtier's own validators, else those of the one union member whose outer type the value
    had (a list for list[TextPart]), if only one had it; else all."""
    own = [e for e in errs if e["type"] in _OWN_CODES]
    if own:
        return own
    inside = {_union_member(e) for e in errs if _union_at(e["loc"]) + 1 < len(e["loc"])}
    return [e for e in errs if _union_member(e) in inside] if len(inside) == 1 else errs


def _code_of(err_type: str) -> str:
    if err_type == "missing":
        return "missing_required_parameter"
    if err_type.endswith(("_type", "_parsing")) or err_type in ("int_from_float", "string_unicode"):
        return "invalid_type"
    return "invalid_value"


# Pydantic names the member of a union in the location: ('prompt', 'list[int]', 0); a member with a
# validator reads 'function-after[_valid_unicode(), str]'.
_VALIDATED = re.compile(r"function-\w+\[\w+\(\), ([^\[\]]+)\]")


def _is_union_tag(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool")


def _union_at(loc: list[str]) -> int:
    return next((i for i, part in enumerate(loc) if _is_union_tag(part)), len(loc))


def _union_member(err: dict[str, Any]) -> str | None:
    i = _union_at(err["loc"])
    return _VALIDATED.sub(r"\1", err["loc"][i]) if i < len(err["loc"]) else None


def _path(loc: list[str]) -> str:
    """The dotted path a client wrote, without pydantic's union member names: 'messages.0.content'."""
    return ".".join(part for part in loc if not _is_union_tag(part))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe_http(request: Request, exc: StarletteHTTPException) -> tuple[str, str | None]:
    """Starlette's and FastAPI's bare reasons ("Not Found", "There was an error parsing the body") as
    (message, code), said with what the client sent; code None: the status's default."""
    route = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and exc.detail == http.HTTPStatus.NOT_FOUND.phrase:
        return f"there is no route {route} on this server", None
    if exc.status_code == 405:
        allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "other methods")
        return f"{route} is not allowed; this route accepts {allowed}", None
    cause = exc.__cause__
    if exc.status_code == 400 and cause is not None:  # FastAPI could not parse the body as JSON
        if isinstance(cause, UnicodeDecodeError):
            return (f"the request body is not valid UTF-8 (byte {cause.object[cause.start]:#04x} at offset "
                    f"{cause.start}); send JSON text encoded as UTF-8"), "invalid_json"
        if isinstance(cause, RecursionError):
            return "the request body nests JSON arrays or objects too deeply to parse", "invalid_json"
        return f"the request body is not valid JSON ({type(cause).__name__}: {cause})", "invalid_json"
    return str(exc.detail), None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 by default; OpenAI clients expect a 400 for a bad parameter.
        return error_response(400, *validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message, code = _describe_http(request, exc)
        return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}",
                              code="internal_error")
