"""Request context: a request id, timing, metrics and the request-log row.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses pass straight through
and the cache-hit path pays as little as possible. The log record is committed
(journaled, and written at once when it settles a quota) just before the
response's last byte is sent, so a response a client received in full is never
lost; a response that never completes (an error, a client gone) submits it at the end.
"""

from __future__ import annotations

import os
import re
import time

from server import metrics
from server.services.logstore import RequestRecord

_JSON = (b"content-type", b"application/json")
# Probes and scrapes are not client traffic: no request id, no metrics, no log row.
_PROBES = frozenset(("/metrics", "/healthz", "/readyz"))


def _as_json(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The API only takes JSON bodies: read them as JSON whatever the client declared.

    `curl -d '{...}'` (the original design's documented call) sends
    application/x-www-form-urlencoded. Every /v1 route needs an API key in a header,
    which a cross-site form cannot send, so this opens no CSRF hole.
    """
    for name, value in headers:
        if name == b"content-type" and b"json" in value:
            return headers
    return [h for h in headers if h[0] != b"content-type"] + [_JSON]


def new_request_id() -> str:
    # 128 random bits as 32 hex digits, like uuid4().hex at a third of the cost.
    return "req_" + os.urandom(16).hex()


# What a client's X-Request-ID may be to be kept (logged, echoed): the request-log
# column's length, and characters that are safe in logs, terminals and URLs.
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,64}")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is a safe value, else a new id."""
    for name, value in headers:
        if name == b"x-request-id":
            if _CLIENT_ID.fullmatch(value):
                return value.decode()
            break
    return new_request_id()


class RequestContextMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _PROBES:
            return await self.app(scope, receive, send)
        request_id = request_id_from(scope["headers"])
        logged = scope["path"].startswith("/v1/")
        if logged and scope["method"] in ("POST", "PATCH", "PUT"):
            scope["headers"] = _as_json(scope["headers"])
        record = RequestRecord(request_id=request_id, route=scope["path"]) if logged else None
        scope.setdefault("state", {}).update(record=record, request_id=request_id)
        started = time.perf_counter()
        status = 500
        logstore = None

        def finish_record():
            nonlocal logstore
            record.route = _route(scope)
            record.status = record.status or status
            record.latency_ms = (time.perf_counter() - started) * 1000
            state = scope.get("app").state if scope.get("app") else None
            llmctl = getattr(state, "llmctl", None)
            logstore = llmctl.logstore if llmctl is not None else None
            return logstore

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode())]
            elif (record is not None and logstore is None and not message.get("more_body")
                  and finish_record() is not None):
                await logstore.commit(record)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            model = (record.model if record else None) or ""
            cache = (record.cache_status if record else None) or "none"
            metrics.observe_request(route, model, status, cache, elapsed)
            if record is not None and logstore is None and finish_record() is not None:
                logstore.submit(record)


def _route(scope) -> str:
    route = getattr(scope.get("route"), "path", None)
    return route or scope["path"][:64]
