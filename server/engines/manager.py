"""MultiModelManager: routes a request's `model` to its engine.

Engines are built from models.yaml on first use, in the background at start for
the default model (`llmctl serve` without --lazy), or all at start (--preload), and
kept for the life of the app. Local models go to LocalEngine (transformers), remote
ones to HttpLLMClient; tests may pass their own `engine_factory`. A model with
several backends or with fallbacks (or that is another's fallback) is a RouterEngine
over one such engine per backend, all sharing the gateway's RetryBudget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from server.config import ModelsConfig, ModelSpec, Settings
from server.engines.base import ModelEngine
from server.engines.retrybudget import RetryBudget
from server.errors import ModelNotFound

log = logging.getLogger("llmctl.engines")

EngineFactory = Callable[[ModelSpec, Settings], ModelEngine]
EngineHook = Callable[[ModelSpec, ModelEngine], None]


def default_engine_factory(spec: ModelSpec, settings: Settings) -> ModelEngine:
    if spec.type == "remote":
        from server.engines.remote import HttpLLMClient

        return HttpLLMClient(spec)
    from server.engines.local import LocalEngine  # imports torch: only when needed

    return LocalEngine(spec, settings)


class MultiModelManager:
    def __init__(self, config: ModelsConfig, settings: Settings,
                 engine_factory: EngineFactory = default_engine_factory,
                 on_engine: EngineHook | None = None):
        self.config = config
        self.settings = settings
        self._factory = engine_factory
        self._on_engine = on_engine  # e.g. to hook metrics into each new engine
        self._engines: dict[str, ModelEngine] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_min)
        self._fallback_targets = config.fallback_targets
        self._warming: dict[str, asyncio.Task] = {}
        self._failed: dict[str, str] = {}  # model name → why its last load failed

    @property
    def specs(self) -> list[ModelSpec]:
        return self.config.models

    def spec(self, ident: str | None) -> ModelSpec:
        """The spec for a short name or full id (None: the default model)."""
        spec = self.config.find(ident)
        if spec is None:
            available = ", ".join(self.config.names) or "none configured"
            what = f"model {ident!r} does not exist" if ident else "no model given and no default"
            raise ModelNotFound(f"{what}; available models: {available}", param="model")
        return spec

    def loaded(self, spec: ModelSpec) -> ModelEngine | None:
        return self._engines.get(spec.name)

    async def get(self, spec: ModelSpec) -> ModelEngine:
        """The started engine for `spec`, building it on first use."""
        engine = self._engines.get(spec.name)
        if engine is not None and engine.ready:
            return engine
        lock = self._locks.setdefault(spec.name, asyncio.Lock())
        async with lock:
            engine = self._engines.get(spec.name)
            if engine is None:
                engine = self._build(spec)
                self._engines[spec.name] = engine
            try:
                await engine.start()
            except Exception as exc:
                self._failed[spec.name] = getattr(exc, "message", None) or repr(exc)
                raise
            self._failed.pop(spec.name, None)
            return engine

    def routed(self, spec: ModelSpec) -> bool:
        return spec.routed or spec.name in self._fallback_targets

    def _build(self, spec: ModelSpec) -> ModelEngine:
        if not self.routed(spec):
            [(_name, _weight, replica)] = spec.replicas()  # a one-entry `backends` list too
            return self._make(replica)
        from server.engines.router import Backend, RouterEngine

        backends = [Backend(spec.name, name, self._make(replica), weight, replica, spec.routing)
                    for name, weight, replica in spec.replicas()]
        return RouterEngine(spec, backends, self.budget,
                            resolve=lambda name: self.get(self.spec(name)))

    def _make(self, spec: ModelSpec) -> ModelEngine:
        engine = self._factory(spec, self.settings)
        if self._on_engine is not None:
            self._on_engine(spec, engine)
        return engine

    def load_in_background(self, spec: ModelSpec) -> None:
        """Start loading `spec` now; a request for it meanwhile waits on the same load.
        A failure is logged in one line and shown by /readyz (see status)."""
        async def load():
            try:
                await self.get(spec)
            except Exception:
                log.error("model %r did not load: %s", spec.name, self._failed.get(spec.name))

        self._warming[spec.name] = asyncio.create_task(load(), name=f"load {spec.name}")

    def status(self, spec: ModelSpec) -> str:
        """loaded, loading, failed or not loaded (it loads on its first request)."""
        engine = self._engines.get(spec.name)
        if engine is not None and engine.ready:
            return "loaded"
        if spec.name in self._failed:
            return "failed"
        task = self._warming.get(spec.name)
        lock = self._locks.get(spec.name)
        if (task is not None and not task.done()) or (lock is not None and lock.locked()):
            return "loading"
        return "not loaded"

    def failure(self, spec: ModelSpec) -> str | None:
        return self._failed.get(spec.name)

    @staticmethod
    def _has_local(spec: ModelSpec) -> bool:
        return any(replica.type == "local" for _, _, replica in spec.replicas())

    async def preload(self) -> None:
        for spec in self.specs:
            if self._has_local(spec):
                await self.get(spec)

    async def start_remote_routers(self) -> None:
        """Start the routed models whose backends are all remote (nothing to load), so
        that their backends' health is watched from the start."""
        for spec in self.specs:
            if self.routed(spec) and not self._has_local(spec):
                await self.get(spec)

    def engine_stats(self) -> dict[str, dict]:
        return {name: dict(getattr(e, "stats", None) or {}) for name, e in self._engines.items()}

    async def health(self) -> dict[str, tuple[bool, str]]:
        return {name: await e.health() for name, e in self._engines.items()}

    @staticmethod
    async def model_status(engine: ModelEngine) -> dict:
        """{ok, reason[, backends]}: a loaded model's health, per backend when routed."""
        ok, reason = await engine.health()
        status = {"ok": ok, "reason": reason}
        backends = getattr(engine, "status", None)
        if callable(backends):
            status["backends"] = backends()
        return status

    async def describe(self) -> list[dict]:
        """Every configured model: loaded or not, health, fallbacks and backends (what
        `llmctl models status` shows)."""
        out = []
        for spec in self.specs:
            engine = self._engines.get(spec.name)
            entry = {"model": spec.name, "loaded": engine is not None,
                     "fallbacks": list(spec.fallbacks)}
            if engine is None:
                entry |= {"ok": None, "reason": "not loaded", "backends": []}
            else:
                entry |= {"backends": [], **await self.model_status(engine)}
            out.append(entry)
        return out

    async def close(self) -> None:
        for task in self._warming.values():
            task.cancel()
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await engine.close()
