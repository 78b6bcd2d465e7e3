"""Every error leaves the API as OpenAI's envelope: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import metrics
from server.errors import InvalidRequest, LlmctlError

log = logging.getLogger("llmctl.api")


def error_response(exc: LlmctlError, request: Request | None = None) -> JSONResponse:
    metrics.observe_error(exc)
    if request is not None:
        record = getattr(request.state, "record", None)
        if record is not None:
            record.error_type = exc.code or exc.error_type
            record.error_message = exc.message
    return JSONResponse(exc.envelope(), status_code=exc.status_code, headers=exc.headers)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid" or tuple(first.get("loc", ())) == ("body",):
        return InvalidRequest("malformed JSON: the request body must be a JSON object",
                              code="invalid_json")
    field = _field(first.get("loc", ()))
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = "is required"
    if field:
        return InvalidRequest(f"{field}: {msg}", param=field, code="invalid_value")
    return InvalidRequest(f"request body: {msg}", code="invalid_value")


def install(app: FastAPI) -> None:
    @app.exception_handler(LlmctlError)
    async def _llmctl(request: Request, exc: LlmctlError):
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        err = LlmctlError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(err, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(LlmctlError("internal server error"), request)
