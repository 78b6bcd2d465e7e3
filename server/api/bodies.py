"""JSON request bodies that a route reads itself, and their OpenAPI documentation.

The completion routes are the cache-hit path, where the web framework is most of
the cost. A FastAPI body parameter plus `Depends` aliases costs ~40 µs a request
in dependency solving and in parsing the JSON into a dict before validating it;
`read_json` validates the raw bytes with the same pydantic model
(`model_validate_json`) and raises the same `RequestValidationError`, locations
under "body", so a client sees exactly the envelope FastAPI's path produced.
`documented(Model)` and `install_schemas` keep the body in /openapi.json.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

M = TypeVar("M", bound=BaseModel)

_REF = "#/components/schemas/{model}"


async def read_json(request: Request, model: type[M]) -> tuple[M | None,
                                                                RequestValidationError | None]:
    """(body, None), or (None, the error) when the body does not fit `model`. A body
    that is not JSON at all raises at once: FastAPI refused those before checking the
    API key, and the rest after it, and the caller keeps that order (deps.key_and_body).
    Content-Type is not looked at (see middleware._as_json)."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw), None
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        invalid = RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors],
                                         body=raw)
        if raw and errors[0]["type"] == "json_invalid":
            raise invalid from None
        return None, invalid


def documented(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that reads `model` with `read_json` (and answers a
    server-sent event stream when the model has a `stream` field)."""
    extra = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _REF.format(model=model.__name__)}}}}}
    if "stream" in model.model_fields:
        extra["responses"] = {"200": {"content": {"text/event-stream": {}}}}
    return extra


def install_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add `models` (and the models they use) to the app's OpenAPI components, where
    `documented` points."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            _, defs = models_json_schema([(m, "validation") for m in models],
                                         ref_template=_REF)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                defs.get("$defs", {}))
        return app.openapi_schema

    app.openapi = openapi
