"""One error hierarchy for the whole project.

Each error knows its HTTP status and OpenAI envelope fields (mapped once in
server/api/errors.py) and its CLI exit code (mapped once in llmctl/cli.py).
Exit codes: 0 ok, 1 error, 2 usage, 3 limit reached, 4 not found, 5 auth.
"""

from __future__ import annotations


class LlmctlError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None
    exit_code = 1

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class ConfigError(LlmctlError):
    error_type = "invalid_configuration"
    exit_code = 2


class InvalidRequest(LlmctlError):
    status_code = 400
    error_type = "invalid_request_error"
    exit_code = 2


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class AuthenticationError(LlmctlError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"
    exit_code = 5


class PermissionDenied(LlmctlError):
    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"
    exit_code = 5


class NotFound(LlmctlError):
    status_code = 404
    error_type = "not_found_error"
    exit_code = 4


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(LlmctlError):
    status_code = 409
    error_type = "conflict_error"


class RateLimited(LlmctlError):
    """Rate, token, concurrency or quota limit, or an overloaded model queue."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    exit_code = 3


class QuotaExceeded(RateLimited):
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class Overloaded(RateLimited):
    code = "overloaded"


class UpstreamError(LlmctlError):
    """A remote model server failed or could not be reached."""

    status_code = 502
    error_type = "upstream_error"
    code = "upstream_error"


class ClientDisconnected(LlmctlError):
    """The client left before its answer was ready (nginx's 499: nobody reads it)."""

    status_code = 499
    error_type = "client_disconnected"
    code = "client_disconnected"


class Unavailable(LlmctlError):
    status_code = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class DatabaseError(Unavailable):
    code = "database_unavailable"


class SchemaOutOfDate(LlmctlError):
    error_type = "schema_out_of_date"
    exit_code = 1
