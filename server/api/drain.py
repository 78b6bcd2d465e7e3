"""Graceful shutdown that answers: on SIGTERM/SIGINT the gateway keeps listening
and finishes the requests in flight, while every new request gets 503
`shutting_down` with `Retry-After` (a load balancer retries it elsewhere). Only
when none is left in flight (or after the grace period) does uvicorn's own
shutdown close the listener. uvicorn alone closes the listener first, so a request
that arrived during the drain met a closed connection (issue 15).
"""

from __future__ import annotations

import time

import uvicorn
from starlette.requests import Request

from server.api.errors import error_response
from server.errors import ShuttingDown


class Drain:
    """Whether the gateway is draining, and how many requests it is serving."""

    def __init__(self):
        self.draining = False
        self.inflight = 0


class DrainMiddleware:
    def __init__(self, app, *, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining:
            err = ShuttingDown("the gateway is shutting down; retry the request",
                               headers={"Retry-After": "1", "Connection": "close"})
            return await error_response(err, Request(scope))(scope, receive, send)
        self.drain.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.inflight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, with the drain in front of its shutdown."""

    def __init__(self, config: uvicorn.Config, *, drain: Drain, grace: float):
        super().__init__(config)
        self.drain = drain
        self.grace = grace
        self._signal: int | None = None
        self._deadline = 0.0

    def handle_exit(self, sig, frame) -> None:
        if self._signal is None:
            self._signal = sig
            self._deadline = time.monotonic() + self.grace
            self.drain.draining = True
            return
        super().handle_exit(sig, frame)  # a second signal: uvicorn's own (or forced) exit

    async def on_tick(self, counter: int) -> bool:
        if (self._signal is not None and not self.should_exit
                and (self.drain.inflight == 0 or time.monotonic() > self._deadline)):
            super().handle_exit(self._signal, None)
        return await super().on_tick(counter)
