"""Every error leaves the API as OpenAI's envelope: {"error": {message, type, param, code}};
`document(app)` lists those responses in /openapi.json, operation by operation."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import metrics
from server.db.engine import unreachable
from server.errors import DatabaseError, InvalidRequest, LlmctlError

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
        # exc.headers: Starlette's 405 names the allowed methods in `Allow`.
        err = LlmctlError(str(exc.detail), headers=dict(exc.headers or {}))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(err, request)

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError):
        # Database.session maps these; this catches a driver error raised elsewhere.
        if unreachable(exc):
            return error_response(DatabaseError("the database is unavailable"), request)
        log.exception("database error on %s", request.url.path)
        return error_response(LlmctlError("internal server error"), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(LlmctlError("internal server error"), request)


ENVELOPE = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}},
    }},
}
_WHY = {
    400: "Bad request: a parameter, query or body field is invalid (`param` names it)",
    401: "No API key, or an unknown, expired or revoked one",
    403: "The key may not use this route or model",
    404: "No such model, key or request log",
    409: "A key with that name or value already exists",
    413: "The request body is larger than the configured limit",
    502: "The remote model server failed or could not be reached",
    429: "A rate, token, concurrency or quota limit, or the model's queue is full "
         "(`Retry-After` says when to retry)",
    503: "The database (or Redis, when it fails closed) is unavailable, or the server is "
         "shutting down (`Retry-After` says when to retry)",
}
_GENERATE = ("/v1/generate", "/v1/completions", "/v1/chat/completions")


def _statuses(path: str, method: str, operation: dict) -> list[int]:
    """What an operation can answer besides success (the API's own answers; FastAPI's
    422 never leaves it: validation errors are 400s)."""
    if not path.startswith("/v1/"):
        return []
    out = [400, 401, 429, 503]
    if path in _GENERATE:
        out += [403, 404, 502]  # the key may not use the model; no such model; remote
    elif path.startswith("/v1/admin/"):
        out += [403, 404]  # not an admin key; a key named in the path or a query
    elif "{" in path:
        out.append(404)
    if path.startswith("/v1/admin/keys") and method in ("post", "patch"):
        out.append(409)
    if "requestBody" in operation:
        out.append(413)
    return sorted(out)


def document(app: FastAPI) -> None:
    """Put the error responses each operation really answers, with the envelope's
    schema, into the app's OpenAPI document (in place of FastAPI's 422)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["ErrorResponse"] = ENVELOPE
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            ref = {"$ref": "#/components/schemas/ErrorResponse"}
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    for status in _statuses(path, method, operation):
                        responses[str(status)] = {
                            "description": _WHY[status],
                            "content": {"application/json": {"schema": ref}}}
        return app.openapi_schema

    app.openapi = openapi
