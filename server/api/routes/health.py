"""/healthz (the process answers), /readyz (it can serve), /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import metrics
from server.api.deps import State
from server.errors import LlmctlError

router = APIRouter()


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State):
    checks: dict[str, dict] = {}
    try:
        await asyncio.to_thread(state.db.ping)
        checks["database"] = {"ok": True}
    except LlmctlError as exc:
        metrics.DATABASE_ERRORS.labels("ping").inc()
        checks["database"] = {"ok": False, "reason": exc.message}
    for spec in state.manager.specs:
        engine = state.manager.loaded(spec)
        if engine is None:
            if state.settings.preload and spec.type == "local":
                checks[f"model:{spec.name}"] = {"ok": False, "reason": "not loaded yet"}
            continue
        ok, reason = await engine.health()
        checks[f"model:{spec.name}"] = {"ok": ok, "reason": reason}
    if state.redis is not None:
        # Fail-open keeps serving on per-process limits: ready, with the reason shown.
        redis = state.redis.status()
        checks["redis"] = {"ok": redis["available"] or not redis["fail_closed"], **redis}
    ready = all(c.get("ok", True) for c in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics")
async def prometheus_metrics():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
