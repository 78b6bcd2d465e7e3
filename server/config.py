"""Settings (env `LLMCTL_*`, `.env`) and the models.yaml registry.

One pydantic-settings class holds every knob; `.env.example` documents each field
(a test keeps the two in step). The original design's unprefixed variables
(`MODEL_DEVICE`, `REDIS_ENABLED`, `REDIS_URL`, `DATABASE_URL`) are accepted as
aliases.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from dotenv import dotenv_values
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.errors import ConfigError

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "float16", "bfloat16"]


def _default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "llmctl"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLMCTL_", env_file=".env", extra="ignore", populate_by_name=True,
        # `.env.example` copied to `.env` as it is: an empty value means "the default".
        env_ignore_empty=True,
    )

    # --- storage
    home: Path = Field(default_factory=_default_home)
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("LLMCTL_DATABASE_URL", "DATABASE_URL")
    )
    # --- models
    models_config: Path | None = None
    model: str | None = None
    model_device: Device = Field(
        default="auto", validation_alias=AliasChoices("LLMCTL_MODEL_DEVICE", "MODEL_DEVICE")
    )
    torch_threads: int | None = None
    preload: bool = False
    # --- server
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_prompts: bool = False
    log_flush_interval: float = 0.25
    log_batch_size: int = 500
    # Request-log rows held in memory while the database is down; past this they wait
    # in the journal (LLMCTL_HOME/journal) and are replayed when it is back.
    log_backlog_max: int = Field(default=20_000, gt=0)
    # How long a request's quota reservation lives unless its gateway renews it: what a
    # killed gateway's requests hold until any replica reclaims it.
    quota_lease_seconds: float = Field(default=60.0, gt=0)
    # Per-key token counters in /metrics (labelled by key id): off by default, since
    # their series grow with the number of keys.
    metrics_per_key: bool = False
    # Largest request body accepted, in bytes; larger ones get 413 before they are read.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # --- redis
    # Unset: Redis is on exactly when a URL is given. REDIS_ENABLED/REDIS_URL are the
    # original design's names.
    redis_enabled: bool | None = Field(
        default=None, validation_alias=AliasChoices("LLMCTL_REDIS_ENABLED", "REDIS_ENABLED")
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("LLMCTL_REDIS_URL", "REDIS_URL")
    )
    redis_fail_closed: bool = False
    # --- limits (per-role defaults; a key's own values win; 0 means unlimited)
    default_rpm: int = 0
    default_tpm: int = 0
    default_max_concurrency: int = 0
    default_monthly_tokens: int = 0
    admin_rpm: int = 0
    admin_tpm: int = 0
    admin_max_concurrency: int = 0
    admin_monthly_tokens: int = 0
    # --- cache
    cache_enabled: bool = True
    cache_ttl: int = 7 * 24 * 3600
    cache_scope: Literal["global", "key"] = "global"
    cache_hits_charge_quota: bool = False
    # --- evals
    # bwrap: bubblewrap namespaces + rlimits; rlimits-only must be asked for by name,
    # it contains nothing but CPU, memory and file size (see evalsuite/sandbox.py).
    sandbox_mode: Literal["bwrap", "rlimits-only"] = "bwrap"
    sandbox_python: Path | None = None
    # The gateway key for `llmctl eval --through` when --api-key is not given.
    api_key: str | None = None
    # --- replicas: the gateway-wide retry budget (server/engines/retrybudget.py)
    retry_budget_ratio: float = Field(default=0.2, ge=0)
    retry_budget_min: int = Field(default=10, ge=0)

    @property
    def redis_active_url(self) -> str | None:
        """The Redis to use, or None: a URL enables it unless REDIS_ENABLED=false; with
        REDIS_ENABLED=true and no URL, the local default."""
        if self.redis_enabled is False:
            return None
        if self.redis_url:
            return self.redis_url
        return "redis://localhost:6379/0" if self.redis_enabled else None

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'llmctl.db'}"


class BackendSpec(BaseModel):
    """One replica of a model (`backends:` in models.yaml). Unset fields are the
    model's own: a backend differs from its model only where it says so."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None  # unique within the model; default: host:port, or "local"
    type: Literal["local", "remote"] | None = None  # default: remote when base_url is set
    weight: float = Field(default=1.0, gt=0)
    base_url: str | None = None
    api: Literal["llmctl", "openai"] | None = None
    api_key_env: str | None = None
    path: str | None = None
    device: Device | None = None
    dtype: DType | None = None
    timeout: float | None = Field(default=None, gt=0)
    connect_timeout: float | None = Field(default=None, gt=0)
    first_byte_timeout: float | None = Field(default=None, gt=0)
    total_timeout: float | None = Field(default=None, gt=0)


class RoutingSpec(BaseModel):
    """How a model with several backends (or fallbacks) spreads and retries requests."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(default=3, ge=1)  # backend attempts per request, the first included
    eject_after: int = Field(default=3, ge=1)  # consecutive failures that eject a backend
    cooldown: float = Field(default=5.0, gt=0)  # first ejection; doubles while it keeps failing
    max_cooldown: float = Field(default=120.0, gt=0)
    probe_interval: float = Field(default=2.0, gt=0)  # active probes of ejected remote backends


class ModelSpec(BaseModel):
    """One entry of models.yaml."""

    model_config = ConfigDict(extra="forbid")

    id: str  # hub id or local directory (local) / the remote's model id (remote)
    name: str | None = None  # short name to select it by; defaults to id
    type: Literal["local", "remote"] = "local"
    base_url: str | None = None  # remote: server URL (…/v1 optional)
    path: str | None = None  # local: load from this directory instead of the hub id
    revision: str | None = None
    device: Device | None = None
    dtype: DType = "auto"
    max_context: int | None = Field(default=None, gt=0)
    max_new_tokens: int = Field(default=512, gt=0)
    max_batch_size: int = Field(default=16, gt=0)
    max_queue: int = Field(default=64, ge=0)
    # remote only
    api: Literal["llmctl", "openai"] = "openai"
    api_key_env: str | None = None
    # The tokenizer the remote uses (a local directory or hub id): prompts are counted
    # with it for admission (without it a prompt is bounded by its UTF-8 byte count),
    # and evals left-truncate long prompts with it, as lm-eval does.
    tokenizer: str | None = None
    timeout: float = Field(default=60.0, gt=0)  # the longest silence between bytes
    connect_timeout: float = Field(default=5.0, gt=0)
    first_byte_timeout: float | None = Field(default=None, gt=0)  # until the response starts
    total_timeout: float | None = Field(default=None, gt=0)  # the whole request
    # replicas and fallbacks (README, "Scaling out")
    backends: list[BackendSpec] = Field(default_factory=list)
    fallbacks: list[str] = Field(default_factory=list)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.type == "remote" and not self.base_url and not self.backends:
            raise ValueError("a remote model needs base_url")
        if self.name is None:
            self.name = self.id
        self.replicas()  # every backend must resolve to a valid spec
        return self

    @property
    def api_key(self) -> str | None:
        """The remote's key, from the environment variable named by `api_key_env` (a
        name each models.yaml entry chooses, so it cannot be a Settings field)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @property
    def routed(self) -> bool:
        """Served through the router: several backends, or fallbacks to other models."""
        return len(self.backends) > 1 or bool(self.fallbacks)

    def replicas(self) -> list[tuple[str, float, ModelSpec]]:
        """(backend name, weight, the backend's own spec) for each backend; a model
        without `backends` is its own single backend."""
        if not self.backends:
            return [(_backend_name(self), 1.0, self._bare())]
        out, seen = [], set()
        for i, b in enumerate(self.backends):
            overrides = b.model_dump(exclude={"name", "weight"}, exclude_none=True)
            if "type" not in overrides:
                overrides["type"] = "remote" if b.base_url else self.type
            if overrides["type"] == "remote" and not (b.base_url or self.base_url):
                raise ValueError(f"backends[{i}]: a remote backend needs base_url")
            spec = self._bare().model_copy(update=overrides)
            name = b.name or _backend_name(spec)
            if name in seen:
                raise ValueError(f"backends[{i}]: backend name {name!r} is used twice; "
                                 "give each backend a distinct name")
            seen.add(name)
            out.append((name, b.weight, spec))
        return out

    def _bare(self) -> ModelSpec:
        return self.model_copy(update={"backends": [], "fallbacks": []})

    @property
    def source(self) -> str:
        """Where a local model's weights come from."""
        return self.path or self.id


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_model: str | None = None
    models: list[ModelSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> ModelsConfig:
        seen: set[str] = set()
        for spec in self.models:
            for ident in {spec.id, spec.name}:
                if ident in seen:
                    raise ValueError(f"model {ident!r} is defined twice")
                seen.add(ident)
        if self.default_model is None and self.models:
            self.default_model = self.models[0].name
        if self.default_model is not None and self.default_model not in seen:
            raise ValueError(f"default_model {self.default_model!r} is not among the models")
        self._check_fallbacks()
        return self

    def _check_fallbacks(self) -> None:
        """Fallbacks name other configured models, and never lead back to themselves."""
        for spec in self.models:
            for other in spec.fallbacks:
                target = self.find(other)
                if target is None or target is spec:
                    raise ValueError(f"model {spec.name!r}: fallback {other!r} is not "
                                     "another configured model")
        for spec in self.models:
            todo, visited = list(spec.fallbacks), set()
            while todo:
                target = self.find(todo.pop())
                if target is spec:
                    raise ValueError(f"model {spec.name!r}: its fallbacks lead back to it")
                if target.name not in visited:
                    visited.add(target.name)
                    todo.extend(target.fallbacks)

    @property
    def fallback_targets(self) -> set[str]:
        return {self.find(f).name for m in self.models for f in m.fallbacks}

    def find(self, ident: str | None) -> ModelSpec | None:
        """Look a model up by short name or full id; None selects the default."""
        ident = ident or self.default_model
        for spec in self.models:
            if ident in (spec.name, spec.id):
                return spec
        return None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


def _backend_name(spec: ModelSpec) -> str:
    if spec.type == "remote" and spec.base_url:
        url = urlsplit(spec.base_url)
        # Without credentials: the name is a metrics label and shown by /v1/backends.
        return url.netloc.rpartition("@")[2] or spec.base_url
    return "local"


def _env_name(field: str) -> str:
    """The environment variable the user set for `field` (an alias or the prefixed
    name), so that an error names what they typed: MODEL_DEVICE, not
    LLMCTL_MODEL_DEVICE."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    names = (list(alias.choices) if isinstance(alias, AliasChoices)
             else [f"LLMCTL_{field.upper()}"])
    env_file = Path(".env")
    dotenv = {k.upper() for k in dotenv_values(env_file)} if env_file.is_file() else set()
    environ = {k.upper() for k in os.environ}
    for pool in (environ, dotenv):
        for name in names:
            if name.upper() in pool:
                return str(name)
    return str(names[0])


def load_settings() -> Settings:
    """Settings from the environment and `.env`; a bad value is a ConfigError that
    names the variable as set and the value, never a pydantic traceback."""
    try:
        return Settings()
    except ValidationError as err:
        first = err.errors()[0]
        loc = str(first["loc"][0]) if first["loc"] else ""
        field = next((name for name, info in Settings.model_fields.items()
                      if loc == name or (isinstance(info.validation_alias, AliasChoices)
                                         and loc in info.validation_alias.choices)), loc)
        raise ConfigError(f"{_env_name(field)}={first.get('input')!r}: "
                          f"{first['msg']}") from None


def _describe(err: ValidationError, data: dict, where: str) -> str:
    first = err.errors()[0]
    loc = list(first["loc"])
    parts = []
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        entry = (data.get("models") or [{}])[loc[1]] if isinstance(data, dict) else {}
        label = entry.get("name") or entry.get("id") if isinstance(entry, dict) else None
        parts.append(f"models[{loc[1]}]" + (f" ({label})" if label else ""))
        loc = loc[2:]
    field = ".".join(str(p) for p in loc)
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {' '.join(parts)}{' ' if parts and field else ''}{field}: {msg}".replace(
        ":  ", ": "
    ).replace(": :", ":")


def load_models_config(settings: Settings, path: Path | str | None = None) -> ModelsConfig:
    """models.yaml from `path`, LLMCTL_MODELS_CONFIG or ./models.yaml; otherwise
    single-model mode from LLMCTL_MODEL (or nothing configured)."""
    candidate = Path(path) if path else settings.models_config
    if candidate is None and Path("models.yaml").exists():
        candidate = Path("models.yaml")
    if candidate is None:
        if settings.model:
            return ModelsConfig(models=[ModelSpec(id=settings.model)])
        return ModelsConfig()
    if not candidate.exists():
        raise ConfigError(f"{candidate}: models config file not found")
    try:
        data = yaml.safe_load(candidate.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{candidate}: not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{candidate}: expected a mapping with 'models' at the top")
    try:
        config = ModelsConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, data, str(candidate))) from None
    # A relative `path:` means "next to this file", wherever `llmctl serve` runs.
    for spec in config.models:
        if spec.path:
            spec.path = str(candidate.parent.resolve() / Path(spec.path).expanduser())
    return config
