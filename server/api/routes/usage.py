"""GET /v1/me/usage: the calling key's own usage.

The body is the report of server/services/usage.py (what `llmctl usage --key KEY
--json` prints) plus `quota`: the key's limits and month-to-date quota, as
`llmctl quotas show KEY --json` prints them."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter

from server.api.deps import CurrentKey, State
from server.services import quotas, usage

router = APIRouter()


@router.get("/v1/me/usage")
async def my_usage(key: CurrentKey, state: State, month: str | None = None,
                   model: str | None = None, by: Literal["key", "model", "month"] = "key"):
    """Usage for this key; `quota` adds its limits and month-to-date quota."""
    if state.logstore is not None:
        await state.logstore.flush()  # include this process's requests up to now
    report = await asyncio.to_thread(usage.usage_report, state.db, key=key.id, month=month,
                                     model=model, by=by)
    report["quota"] = (await asyncio.to_thread(quotas.get_quota, state.db, state.settings,
                                               key.id)).to_dict()
    return report
