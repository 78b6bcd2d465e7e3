"""/healthz (the process answers), /readyz (it can serve), /metrics (Prometheus).

/readyz's `models` maps each configured model to loaded, loading, failed or not
loaded (loads on its first request); a loading model, or a failed default model,
makes it 503. A model with replicas is ready while at least one of its backends is
in rotation; its check lists every backend and whether it is."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import metrics
from server.api.deps import State
from server.errors import LlmctlError

router = APIRouter()


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: the same body, with the "
                                                     "failing checks"}})
async def readyz(state: State):
    checks: dict[str, dict] = {}
    try:
        await asyncio.to_thread(state.db.ping)
        checks["database"] = {"ok": True}
    except LlmctlError as exc:
        metrics.DATABASE_ERRORS.labels("ping").inc()
        checks["database"] = {"ok": False, "reason": exc.message}
    models = {}
    for spec in state.manager.specs:
        models[spec.name] = status = state.manager.status(spec)
        engine = state.manager.loaded(spec)
        # A broken non-default model shows in `models` but does not take the gateway
        # out of service; the default one (what most requests get) does.
        if status == "loading" or (status == "failed" and spec.name == state.models.default_model):
            checks[f"model:{spec.name}"] = {
                "ok": False, "reason": state.manager.failure(spec) or status}
        elif engine is not None and status != "failed":
            checks[f"model:{spec.name}"] = await state.manager.model_status(engine)
        elif state.settings.preload and spec.type == "local":
            checks[f"model:{spec.name}"] = {"ok": False, "reason": "not loaded yet"}
    if state.redis is not None:
        # Fail-open keeps serving on per-process limits: ready, with the reason shown.
        redis = state.redis.status()
        checks["redis"] = {"ok": redis["available"] or not redis["fail_closed"], **redis}
    ready = all(c.get("ok", True) for c in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks,
                         "models": models},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def prometheus_metrics():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
