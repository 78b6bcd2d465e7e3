"""/v1/admin/*: keys, usage, quotas and request logs, for admin keys only.

Every route calls the same service function as the matching `llmctl` command and
returns the same JSON that command prints with `--json`:

    POST   /v1/admin/keys                     keys create      (201, secret shown once)
    GET    /v1/admin/keys                     keys list
    GET    /v1/admin/keys/{key}               keys show
    PATCH  /v1/admin/keys/{key}               keys update
    POST   /v1/admin/keys/{key}/revoke        keys revoke      (DELETE /v1/admin/keys/{key} too)
    POST   /v1/admin/keys/{key}/rotate        keys rotate
    GET    /v1/admin/usage                    usage
    GET    /v1/admin/quotas                   quotas show
    GET    /v1/admin/quotas/{key}             quotas show KEY
    PATCH  /v1/admin/quotas/{key}             quotas set KEY
    GET    /v1/admin/logs                     logs search
    GET    /v1/admin/logs/{request_id}        logs show

`{key}` is a key's id, name or prefix. No key → 401; a user key → 403.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict

from server.api.deps import State, require_admin
from server.services import keys as keysvc
from server.services import logquery, quotas, usage
from server.validation import Count

# The dependency on the router itself: no admin route can forget it.
router = APIRouter(prefix="/v1/admin", dependencies=[Depends(require_admin)], tags=["admin"])

Limit = Count | None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    role: Literal["admin", "user"] = "user"
    models: list[str] | None = None
    expires_in: str | None = None  # 30d, 12h, ...
    value: str | None = None  # import an existing secret
    rpm: Limit = None
    tpm: Limit = None
    max_concurrency: Limit = None
    monthly_token_quota: Limit = None


class KeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["admin", "user"] | None = None
    models: list[str] | None = None
    expires_in: str | None = None
    rpm: Limit = None
    tpm: Limit = None
    max_concurrency: Limit = None
    monthly_token_quota: Limit = None


class QuotaUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    monthly_token_quota: Limit = None
    rpm: Limit = None
    tpm: Limit = None
    max_concurrency: Limit = None


def _created(created: keysvc.CreatedKey) -> dict:
    return {"secret": created.secret, **created.key.to_dict()}


# ----- keys (plain `def`: FastAPI runs them in its threadpool, off the event loop)

@router.post("/keys", status_code=201)
def create_key(body: KeyCreate, state: State):
    return _created(keysvc.create_key(
        state.db, name=body.name, role=body.role, models=body.models,
        expires_in=body.expires_in, value=body.value, rpm=body.rpm, tpm=body.tpm,
        max_concurrency=body.max_concurrency, monthly_token_quota=body.monthly_token_quota))


@router.get("/keys")
def list_keys(state: State):
    return [k.to_dict() for k in keysvc.list_keys(state.db)]


@router.get("/keys/{key}")
def show_key(key: str, state: State):
    return keysvc.get_key(state.db, key).to_dict()


@router.patch("/keys/{key}")
def update_key(key: str, body: KeyUpdate, state: State):
    return keysvc.update_key(
        state.db, key, role=body.role, models=body.models, expires_in=body.expires_in,
        rpm=body.rpm, tpm=body.tpm, max_concurrency=body.max_concurrency,
        monthly_token_quota=body.monthly_token_quota).to_dict()


@router.post("/keys/{key}/revoke")
@router.delete("/keys/{key}")
def revoke_key(key: str, state: State):
    return keysvc.revoke_key(state.db, key).to_dict()


@router.post("/keys/{key}/rotate")
def rotate_key(key: str, state: State):
    return _created(keysvc.rotate_key(state.db, key))


# ----- usage and quotas

async def _flushed(state) -> None:
    """Write this process's pending request logs first, so reads include them."""
    if state.logstore is not None:
        await state.logstore.flush()


@router.get("/usage")
async def get_usage(state: State, key: str | None = None, month: str | None = None,
                    model: str | None = None, by: Literal["key", "model", "month"] = "key"):
    await _flushed(state)
    return await asyncio.to_thread(usage.usage_report, state.db, key=key, month=month,
                                   model=model, by=by)


@router.get("/quotas")
def list_quotas(state: State, month: str | None = None):
    month = usage.parse_month(month) or quotas.current_month()
    return [q.to_dict() for q in quotas.list_quotas(state.db, state.settings, month)]


@router.get("/quotas/{key}")
def show_quota(key: str, state: State, month: str | None = None):
    month = usage.parse_month(month) or quotas.current_month()
    return quotas.get_quota(state.db, state.settings, key, month).to_dict()


@router.patch("/quotas/{key}")
def set_quota(key: str, body: QuotaUpdate, state: State):
    return quotas.set_limits(state.db, state.settings, key, **body.model_dump()).to_dict()


# ----- request logs

@router.get("/logs")
async def search_logs(
    state: State, key: str | None = None, model: str | None = None,
    status: str | None = None, since: str | None = None, until: str | None = None,
    limit: Annotated[int, Query(ge=1, le=logquery.MAX_LIMIT)] = 50, cursor: str | None = None,
):
    await _flushed(state)
    return await asyncio.to_thread(logquery.search, state.db, key=key, model=model,
                                   status=status, since=since, until=until, limit=limit,
                                   cursor=cursor)


@router.get("/logs/{request_id}")
async def show_log(request_id: str, state: State):
    await _flushed(state)
    return await asyncio.to_thread(logquery.show, state.db, request_id)
