"""Stop work for a client that has gone.

A streamed response notices a disconnect when it writes (Starlette cancels it); a
non-streamed one would generate to the end for nobody, holding a batch slot or a
remote backend's. `unless_disconnected` races the work against the ASGI
`http.disconnect` message and cancels the work when the client leaves first: a
local generation is dropped from its batch, a remote backend's connection is closed
(llmctl and vLLM stop generating when theirs closes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from server.errors import ClientDisconnected

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    # The body has been read: the next message is the disconnect (or, once the
    # response is sent, the server's own end-of-request notice).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected("the client closed the connection before the response")
    return task.result()
