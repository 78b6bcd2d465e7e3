"""Small `Depends` aliases: the app state, the calling API key, admin-only access; and
`key_and_body`, the same checks for the routes that skip dependency solving."""

from __future__ import annotations

import asyncio
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel

from server.api.bodies import read_json
from server.api.state import AppState
from server.errors import PermissionDenied
from server.services.keys import KeyInfo, verify_key

M = TypeVar("M", bound=BaseModel)


async def get_state(request: Request) -> AppState:
    # async: FastAPI runs a plain `def` dependency in the threadpool, a thread hop
    # per request for an attribute read.
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
    return await authenticate_request(request, state)


async def authenticate_request(request: Request, state: AppState) -> KeyInfo:
    """The calling key (also called directly by the completion routes, which skip
    FastAPI's dependency solving)."""
    secret = presented_secret(request)
    if state.db.is_sqlite:
        # Embedded SQLite answers an indexed read in microseconds and, in WAL mode,
        # never waits for writers: inline, without a thread hop (the cache-hit path).
        key = verify_key(state.db, secret, lookup=state.key_lookup)
    else:
        # A server database is a network round trip: never on the event loop.
        key = await asyncio.to_thread(verify_key, state.db, secret, lookup=state.key_lookup)
    record = getattr(request.state, "record", None)
    if record is not None:
        record.key_id = key.id
    return key


CurrentKey = Annotated[KeyInfo, Depends(authenticate)]


async def key_and_body(request: Request, model: type[M]) -> tuple[AppState, KeyInfo, M]:
    """The app state, the calling key and the validated JSON body, checked in the order
    FastAPI's parameters would be (malformed JSON, then the key, then the fields), for
    the completion routes, which skip FastAPI's dependency solving and body parameters
    (server/api/bodies.py)."""
    state = request.app.state.llmctl
    body, invalid = await read_json(request, model)
    key = await authenticate_request(request, state)
    if invalid is not None:
        raise invalid
    return state, key, body


async def require_admin(key: CurrentKey) -> KeyInfo:
    if not key.is_admin:
        raise PermissionDenied("this route needs an admin key")
    return key


AdminKey = Annotated[KeyInfo, Depends(require_admin)]
