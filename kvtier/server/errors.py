"""OpenAI-shaped errors ({"error": {"message", "type", "param", "code"}}) and the handlers that make them.

Every failure the server answers, FastAPI's own validation included, goes through `error_response`,
so a client sees one shape whatever went wrong.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# OpenAI's error types by status; `code` is a short machine-readable reason like OpenAI's.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
          503: "server_error"}


class APIError(Exception):
    """A request the server refuses; raised anywhere in a handler, answered as an OpenAI error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic's errors as one sentence per top-level field, and the first field as OpenAI's `param`."""
    by_field: dict[str, list[dict[str, Any]]] = {}
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', '')})", None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        by_field.setdefault(loc[0] if loc else "", []).append({**err, "loc": loc})
    parts = [_field_message(field, errs) for field, errs in by_field.items()]
    return "; ".join(parts), next(iter(by_field), "") or None


def _field_message(field: str, errs: list[dict[str, Any]]) -> str:
    first = errs[0]
    if not field:
        if first.get("type") == "missing":
            return "the request needs a JSON body"
        return "the request body must be a JSON object sent with Content-Type: application/json"
    if first.get("type") == "extra_forbidden":
        return f"unknown field {'.'.join(first['loc'])!r}: kvtier does not support it; remove it"
    members = list(dict.fromkeys(m for m in map(_union_member, errs) if m))
    if len(members) > 1:  # every member of a union refused the value: say what would have been accepted
        return f"{field}: {_short(first.get('input'))} is none of the accepted types ({', '.join(members)})"
    return f"{'.'.join(first['loc'])}: {first.get('msg')}"


def _union_member(err: dict[str, Any]) -> str | None:
    """Pydantic names the member of a union in the location: ('prompt', 'list[int]', 0)."""
    loc = err["loc"]
    if len(loc) > 1 and (loc[1] in ("str", "int", "float", "bool") or loc[1].startswith(("list[", "dict["))):
        return loc[1]
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 by default; OpenAI clients expect a 400 for a bad parameter.
        message, param = validation_message(list(exc.errors()))
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}",
                              code="internal_error")
