"""GET /v1/models: the configured models, in OpenAI's list format."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import CurrentKey, State

router = APIRouter()


def _entry(spec, created: int) -> dict:
    # `id` is what clients send back as `model`; `root` is the full id (vLLM's field).
    return {"id": spec.name, "object": "model", "created": created, "owned_by": "llmctl",
            "root": spec.id, "type": spec.type,
            "max_model_len": spec.max_context, "max_new_tokens": spec.max_new_tokens}


@router.get("/v1/models")
async def list_models(key: CurrentKey, state: State):
    created = state.started_at
    specs = [s for s in state.manager.specs if key.allows({s.name, s.id})]
    return {"object": "list", "data": [_entry(s, created) for s in specs]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, key: CurrentKey, state: State):
    spec = state.manager.spec(model)
    return _entry(spec, state.started_at)
