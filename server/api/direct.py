"""The completion routes, dispatched without the framework's routing.

A cache hit costs so little that FastAPI's own per-request machinery was about a
quarter of it: matching the path against every route, the exception and exit-stack
middleware, the request/response wrapper and dependency solving (~90 µs of a
~340 µs hit, measured in-process). So `POST /v1/generate`, `/v1/completions` and
`/v1/chat/completions` are dispatched here, by exact path, to the same endpoint
functions FastAPI registered, and what they raise goes to the same handlers
(server/api/errors.py) FastAPI's exception middleware would have called. Everything
else (other methods on these paths, every other route, /openapi.json) is FastAPI's.
"""

from __future__ import annotations

import inspect

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request

DIRECT_PATHS = ("/v1/generate", "/v1/completions", "/v1/chat/completions")


def direct_routes(*routers: APIRouter) -> dict[str, APIRoute]:
    """The POST routes for DIRECT_PATHS among `routers` (included without a prefix)."""
    found = {route.path: route for router in routers for route in router.routes
             if isinstance(route, APIRoute) and route.path in DIRECT_PATHS
             and "POST" in route.methods}
    missing = set(DIRECT_PATHS) - set(found)
    if missing:
        raise RuntimeError(f"no POST route for {sorted(missing)}")
    for route in found.values():
        # Only `endpoint(request)` is called here: a dependency or parameter FastAPI
        # would have resolved must not be skipped without anyone noticing.
        d = route.dependant
        if (d.dependencies or d.body_params or d.query_params or d.header_params
                or d.cookie_params or d.path_params or route.dependencies):
            raise RuntimeError(f"{route.path} takes parameters or dependencies; a direct "
                               "route's endpoint may take only the Request")
    return found


class DirectRoutes:
    """ASGI middleware: serves DIRECT_PATHS itself, passes everything else on."""

    def __init__(self, app, *, routes: dict[str, APIRoute], handlers: dict):
        self.app = app
        self.routes = routes
        # The app's exception handlers (a live view: errors.install fills it). The one
        # for Exception belongs to the outer ServerErrorMiddleware, as in Starlette.
        self.handlers = handlers

    async def __call__(self, scope, receive, send):
        route = None
        if scope["type"] == "http" and scope["method"] == "POST":
            path, root = scope["path"], scope.get("root_path", "")
            route = self.routes.get(path[len(root):] if root and path.startswith(root)
                                    else path)
        if route is None:
            return await self.app(scope, receive, send)
        # What the router would have recorded (the middleware labels metrics by it).
        scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, {}
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
        await response(scope, receive, send)

    def _handler(self, exc: Exception):
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in self.handlers:
                return self.handlers[cls]
        return None
