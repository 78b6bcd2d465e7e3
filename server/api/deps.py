"""Small `Depends` aliases: the app state, the calling API key, admin-only access."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request

from server.api.state import AppState
from server.errors import PermissionDenied
from server.services.keys import KeyInfo, verify_key


def get_state(request: Request) -> AppState:
    return request.app.state.llmctl


State = Annotated[AppState, Depends(get_state)]


def presented_secret(request: Request) -> str | None:
    """`X-API-Key: <key>` (the original API) or `Authorization: Bearer <key>` (OpenAI)."""
    secret = request.headers.get("x-api-key")
    if secret:
        return secret.strip()
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def authenticate(request: Request, state: State) -> KeyInfo:
    secret = presented_secret(request)
    if state.db.is_sqlite:
        # Embedded SQLite answers an indexed read in microseconds and, in WAL mode,
        # never waits for writers: inline, without a thread hop (the cache-hit path).
        key = verify_key(state.db, secret)
    else:
        # A server database is a network round trip: never on the event loop.
        key = await asyncio.to_thread(verify_key, state.db, secret)
    record = getattr(request.state, "record", None)
    if record is not None:
        record.key_id = key.id
    return key


CurrentKey = Annotated[KeyInfo, Depends(authenticate)]


def require_admin(key: CurrentKey) -> KeyInfo:
    if not key.is_admin:
        raise PermissionDenied("this route needs an admin key")
    return key


AdminKey = Annotated[KeyInfo, Depends(require_admin)]
