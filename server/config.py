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
    # Per-key token counters in /metrics (labelled by key id): off by default, since
    # their series grow with the number of keys.
    metrics_per_key: bool = False
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
    timeout: float = Field(default=60.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.type == "remote" and not self.base_url:
            raise ValueError("a remote model needs base_url")
        if self.name is None:
            self.name = self.id
        return self

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
        return self

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
