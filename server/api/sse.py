"""Server-sent events framing (`data: {...}\\n\\n`, OpenAI's `data: [DONE]`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from server.errors import LlmctlError


def event(data) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An error after the response started can only be reported in the stream."""
    try:
        async for chunk in events:
            yield chunk
    except LlmctlError as exc:
        yield event(exc.envelope())


def response(events: AsyncIterator[str], headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(guarded(events), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", **headers})
