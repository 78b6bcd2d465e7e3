"""`llmctl models`: what is configured, how a running gateway's backends are doing,
and a test model for offline use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl import context, output
from llmctl.gateway import admin_get
from llmctl.output import JsonOption
from server.config import load_models_config
from server.errors import InvalidRequest

app = typer.Typer(help="Configured models and test models.", no_args_is_help=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="models.yaml (default: LLMCTL_MODELS_CONFIG "
                              "or ./models.yaml).")]


@app.command("list")
def list_(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False):
    """List the models from models.yaml (or LLMCTL_MODEL)."""
    cfg = load_models_config(context.get(ctx).settings, config)
    data = {"default_model": cfg.default_model,
            "models": [m.model_dump(exclude_none=True) for m in cfg.models]}
    rows = [[m.name, m.id, m.type, m.base_url or m.source, m.device or "auto", m.dtype,
             m.max_context, m.max_new_tokens, "yes" if m.name == cfg.default_model else ""]
            for m in cfg.models]
    output.emit(data, as_json, lambda: output.table(
        "Models", ["name", "id", "type", "source", "device", "dtype", "context", "max new",
                   "default"], rows) if rows else "no models configured")


@app.command("status")
def status(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option("--url", help="The gateway (default: "
                                            "http://LLMCTL_HOST:LLMCTL_PORT).")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LLMCTL_API_KEY",
                                                help="An admin key.")] = None,
    as_json: JsonOption = False,
):
    """Show each model's backends on a running gateway: health, in flight, errors."""
    settings = context.get(ctx).settings
    data = admin_get(url or f"http://{settings.host}:{settings.port}", api_key,
                     "/v1/admin/models/status")
    rows = []
    for m in data["models"]:
        health = {None: "not loaded", True: "ok", False: "DOWN"}[m["ok"]]
        if not m["backends"]:
            rows.append([m["model"], "-", health, "", "", "", "", m["reason"]])
        for b in m["backends"]:
            recent = ", ".join(f"{k} {v}" for k, v in b["recent_errors"].items())
            rows.append([m["model"], b["name"], "ok" if b["healthy"] else
                         f"ejected ({b['ejected_for_s']:g}s)", b["in_flight"], b["requests"],
                         b["errors"], recent, b["url"] or b["type"]])
    output.emit(data, as_json, lambda: output.table(
        "Backends", ["model", "backend", "health", "in flight", "requests", "errors",
                     "errors (last 60 s)", "where"], rows))


@app.command("create-test-model")
def create_test_model(
    directory: Annotated[Path, typer.Argument(help="Where to write the model.")],
    size: Annotated[str, typer.Option("--size", help="tiny (tests) or small (~35M, "
                                      "benchmarks).")] = "tiny",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: JsonOption = False,
):
    """Write a random-weight test model for smoke tests, CI and air-gapped checks.

    The model (Llama architecture, with its own byte-level BPE tokenizer and a chat
    template) loads offline like any hub model; its output is gibberish.
    """
    from server.testmodel import SIZES
    from server.testmodel import create_test_model as build

    if size not in SIZES:
        raise InvalidRequest(f"--size: {size!r} is not one of {', '.join(SIZES)}", param="size")
    path = build(directory, size=size, seed=seed)
    output.emit({"path": str(path.resolve()), "size": size}, as_json,
                lambda: f"wrote a {size} test model to {path}")
