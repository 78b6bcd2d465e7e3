"""Request bodies larger than `max_body_bytes` are refused with 413, before they are read.

A body that declares its length (Content-Length) is refused at once, without
reading a byte of it; one sent in chunks is counted as it arrives and refused as
soon as it passes the limit. Without this, a 10 MB prompt was read, parsed and
tokenized whole, and froze the gateway for 17 s (issue 15).
"""

from __future__ import annotations

from starlette.requests import Request

from server.api.errors import error_response
from server.errors import PayloadTooLarge


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body: larger than this gateway's limit of {limit} "
                           "bytes (LLMCTL_MAX_BODY_BYTES)", headers={"Connection": "close"})


def _declared_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


class BodyLimitMiddleware:
    def __init__(self, app, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = error_response(_too_large(self.max_bytes), Request(scope))
            return await response(scope, receive, send)
        if declared is not None:  # the server never delivers more than declared
            return await self.app(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised into whoever reads the body; the error handlers answer 413.
                    raise _too_large(self.max_bytes)
            return message

        await self.app(scope, counted, send)
