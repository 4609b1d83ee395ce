"""Errors as OpenAI shapes them ({"error": {"message", "type", "param", "code"}}), from kbsync's errors,
schema validation and the web stack's own (unknown route, oversized body); a bug is a logged 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kbsync.errors import BadInput, Busy, KbsyncError, NotFound

log = logging.getLogger("kbsync.api")


class Unauthorized(KbsyncError):
    """A mutating request without the right bearer token."""


class TooLarge(BadInput):
    """A request over one of the [serve] limits, or a body over the size limit (HTTP 413)."""


class UnknownModel(NotFound):
    """A request for a model this daemon does not serve."""


def error_body(message: str, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(message: str, status: int, code: str | None = None, param: str | None = None) -> JSONResponse:
    """A JSON error response (401s also say how to authenticate)."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(message, status, code, param), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line for the first schema error: "'max_tokens': Input should be a valid integer"."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "request body is not JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
    field = ".".join(loc)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "model_attributes_type":
        return "request body must be a JSON object", None
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{field}'", field or None
    if first.get("type") == "missing":
        return f"'{field}' is required", field or None
    return (f"'{field}': {msg}" if field else msg), field or None


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into an OpenAI-shaped error."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if tuple(first.get("loc", ()))[:1] == ("path",):  # /edits/abc names no resource: not a bad body
            return error_response(f"no edit with id {request.url.path.rstrip('/').split('/')[2]!r}", 404, "not_found")
        message, param = _validation_message(exc)
        return error_response(message, 400, "invalid_request", param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(f"no endpoint {request.method} {request.url.path}", 404, "not_found")
        if exc.status_code == 405:
            return error_response(f"{request.method} is not allowed on {request.url.path}", 405, "method_not_allowed")
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(KbsyncError)
    async def _kbsync(_: Request, exc: KbsyncError) -> JSONResponse:
        if isinstance(exc, Unauthorized):
            return error_response(str(exc), 401, "invalid_api_key")
        if isinstance(exc, TooLarge):
            return error_response(str(exc), 413, "request_too_large")
        if isinstance(exc, UnknownModel):
            return error_response(str(exc), 404, "model_not_found", "model")
        if isinstance(exc, NotFound):
            return error_response(str(exc), 404, "not_found")
        if isinstance(exc, Busy):
            return error_response(str(exc), 409, "busy")
        return error_response(str(exc), 400, "invalid_request")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug must not kill the server; the log keeps the traceback.
        log.error("API %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(f"internal error: {type(exc).__name__}: {exc}", 500, "internal_error")
