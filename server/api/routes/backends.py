"""GET /v1/admin/models/status: each model's backends as this gateway sees them
(health, in-flight requests, recent errors). `llmctl models status` prints it."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.api.deps import State, require_admin

router = APIRouter(prefix="/v1/admin", dependencies=[Depends(require_admin)], tags=["admin"])


@router.get("/models/status")
async def models_status(state: State):
    return {"models": await state.manager.describe()}
