"""`llmctl serve`: run the gateway under uvicorn.

The database is checked and the port bound here, before the app starts, so that
either failing is one line and exit code 1 (uvicorn's own exit code for a failed
start, 3, is llmctl's "limit reached").
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Annotated

import typer

from llmctl import context
from server.errors import ConfigError, LlmctlError

NO_MODELS = ("no models configured: pass --config models.yaml, set LLMCTL_MODELS_CONFIG, "
             "put a models.yaml in the working directory, or set LLMCTL_MODEL=<hub id or "
             "directory> (see README, Configuration)")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise LlmctlError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535, help="Port.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="models.yaml.")] = None,
    preload: Annotated[bool, typer.Option(
        "--preload", help="Load every local model before serving.")] = False,
    lazy: Annotated[bool, typer.Option(
        "--lazy", help="Load no model at start, each on its first request.")] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
):
    """Run the API gateway (FastAPI under uvicorn).

    The default model starts loading at once; /readyz answers 503 until it is loaded."""
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
    if not models.models:
        raise ConfigError(NO_MODELS)
    db = context.get(ctx).db  # an unreachable or outdated database: one line, not a traceback
    db.ensure_schema()
    db.dispose()
    sock = _bind(settings.host, settings.port)
    app = create_app(settings, models, load_default=not lazy)
    grace = 30
    server = DrainingServer(uvicorn.Config(
        app, log_level=log_level, access_log=False, timeout_graceful_shutdown=grace),
        drain=app.state.drain, grace=grace)
    try:
        server.run(sockets=[sock])
    except SystemExit:
        if server.started:
            raise
        raise typer.Exit(1) from None  # startup failed, as uvicorn has logged; not its 3
    if not server.started:
        raise typer.Exit(1)
