"""`llmctl serve`: run the gateway under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl import context


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="models.yaml.")] = None,
    preload: Annotated[bool, typer.Option("--preload", help="Load local models at start.")] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
):
    """Run the API gateway (FastAPI under uvicorn)."""
    import uvicorn

    from server.api.app import create_app
    from server.api.drain import DrainingServer
    from server.config import load_models_config

    settings = context.get(ctx).settings
    updates = {k: v for k, v in {"host": host, "port": port, "models_config": config}.items()
               if v is not None}
    if preload:
        updates["preload"] = True
    settings = settings.model_copy(update=updates)
    models = load_models_config(settings)  # fail fast, before binding the port
    app = create_app(settings, models)
    grace = 30
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            access_log=False, timeout_graceful_shutdown=grace)
    DrainingServer(config, drain=app.state.drain, grace=grace).run()
