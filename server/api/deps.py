"""Small `Depends` aliases: the app state, the calling API key, admin-only access."""

from __future__ import annotations

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


def authenticate(request: Request, state: State) -> KeyInfo:
    # A plain `def`: FastAPI runs it in the threadpool, so the DB lookup never
    # blocks the event loop.
    key = verify_key(state.db, presented_secret(request))
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
