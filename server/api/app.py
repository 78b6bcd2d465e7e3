"""create_app(settings): the FastAPI gateway.

Everything stateful (database, engines, log writer, limiter, cache, Redis) is built
in the lifespan and kept on `app.state.llmctl`; nothing is created at import.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import metrics
from server.api import bodies, errors
from server.api.bodylimit import BodyLimitMiddleware
from server.api.direct import DirectRoutes, direct_routes
from server.api.drain import Drain, DrainMiddleware
from server.api.middleware import RequestContextMiddleware
from server.api.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from server.api.routes import admin, backends, generate, health, openai
from server.api.routes import models as model_routes
from server.api.routes import usage as usage_routes
from server.api.serving import Gateway
from server.api.state import AppState
from server.config import ModelsConfig, Settings, load_models_config
from server.db.engine import Database
from server.engines.manager import EngineFactory, MultiModelManager, default_engine_factory
from server.services import evalscores, sqlitereader
from server.services.cache import CompletionCache
from server.services.keys import KeyLookup, RecentKeys
from server.services.limits import Limiter
from server.services.logstore import LogStore
from server.services.redisconn import RedisHandle
from server.services.sqlitereader import SqliteReader

log = logging.getLogger("llmctl.api")


def create_app(settings: Settings | None = None, models: ModelsConfig | None = None, *,
               engine_factory: EngineFactory = default_engine_factory,
               load_default: bool = False) -> FastAPI:
    """`load_default`: start loading the default model in the lifespan, in the
    background (`llmctl serve` without --lazy); /readyz is 503 until it is loaded."""
    settings = settings or Settings()
    models = models if models is not None else load_models_config(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        db = Database.from_settings(settings)
        await asyncio.to_thread(db.ensure_schema)
        redis = RedisHandle.from_settings(settings)
        if redis is not None:
            await redis.connect()
        manager = MultiModelManager(models, settings, engine_factory,
                                    on_engine=metrics.observe_engine)
        logstore = LogStore(db, interval=settings.log_flush_interval,
                            batch_size=settings.log_batch_size, keep_text=settings.log_prompts,
                            journal_dir=settings.home / "journal",
                            max_backlog=settings.log_backlog_max)
        logstore.start()
        limiter = Limiter(settings, db, redis)
        limiter.start()
        cache = CompletionCache(settings, db, redis)
        await cache.start()
        key_lookup = KeyLookup(SqliteReader(db)) if sqlitereader.usable(db) else RecentKeys(db)
        state = AppState(settings=settings, models=models, db=db, manager=manager,
                         logstore=logstore, redis=redis, limiter=limiter, cache=cache,
                         started_at=int(time.time()),
                         key_lookup=key_lookup)
        state.gateway = Gateway(settings, manager, limiter=limiter, cache=state.cache)
        app.state.llmctl = state
        metrics.watch(manager)
        metrics.watch_evals(lambda: evalscores.latest_scores(db))
        if settings.preload:
            await manager.preload()
        elif load_default and models.default_model is not None:
            manager.load_in_background(manager.spec(None))
        # Models with replicas on remote servers: watched from start-up.
        await manager.start_remote_routers()
        try:
            yield
        finally:
            # uvicorn has finished in-flight requests by now; write their logs last.
            await limiter.close()
            await manager.close()
            await cache.close()
            await logstore.close()
            if state.key_lookup is not None:
                state.key_lookup.close()
            if redis is not None:
                await redis.close()
            db.dispose()

    app = FastAPI(title="llmctl", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    errors.install(app)
    for module in (health, generate, openai, model_routes, usage_routes, admin, backends):
        app.include_router(module.router)
    bodies.install_schemas(app, [GenerateRequest, CompletionRequest, ChatCompletionRequest])
    errors.document(app)
    # Innermost first: the request context wraps the completion routes' direct dispatch.
    app.add_middleware(DirectRoutes, routes=direct_routes(generate.router, openai.router),
                       handlers=app.exception_handlers)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # `llmctl serve` sets `draining` on SIGTERM (server/api/drain.py).
    app.state.drain = Drain()
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(RequestContextMiddleware)
    return app
