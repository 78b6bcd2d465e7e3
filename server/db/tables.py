"""The ORM schema. Alembic's migrations under migrations/ must produce exactly this.

Times are naive UTC (`utcnow()`), so SQLite and Postgres store and compare the same.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so autogenerate diffs and downgrades are stable.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only autoincrements INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ApiKey(Base):
    """An API key. Only the SHA-256 of the secret is stored; `prefix` identifies it."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="user")
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # Limits; NULL means "the role's default from settings".
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    monthly_token_quota: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class QuotaMonth(Base):
    """A key's token ledger for one calendar month (UTC).

    `used_tokens` is settled usage; `reserved_tokens` is held by requests in flight.
    Admission is one conditional UPDATE, so replicas sharing the database cannot
    overshoot the quota together.
    """

    __tablename__ = "quota_months"

    key_id: Mapped[int] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True
    )
    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    used_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageMonthly(Base):
    """Aggregated usage per key, month and model."""

    __tablename__ = "usage_monthly"
    __table_args__ = (
        UniqueConstraint("key_id", "month", "model", name="uq_usage_key_month_model"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    month: Mapped[str] = mapped_column(String(7), index=True)
    model: Mapped[str] = mapped_column(String(256))
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # Tokens charged against the quota (cache hits may be free, see settings).
    charged_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class RequestLog(Base):
    """One row per API request, successful or not."""

    __tablename__ = "request_logs"
    __table_args__ = (
        Index("ix_request_logs_key_created", "key_id", "created_at"),
        Index("ix_request_logs_model_created", "model", "created_at"),
        Index("ix_request_logs_status_created", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # Not unique: a client's X-Request-ID is kept, and clients reuse theirs on retries.
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    route: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    charged_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    cache_status: Mapped[str | None] = mapped_column(String(8), nullable=True)  # hit/miss/bypass
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Models with replicas: the "model/backend" that answered, and the attempts it took.
    backend: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Stored only with LLMCTL_LOG_PROMPTS=true.
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    output: Mapped[str | None] = mapped_column(Text, nullable=True)


class CompletionCache(Base):
    """A cached deterministic completion, keyed by model, prompt and parameters."""

    __tablename__ = "completion_cache"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # sha256 over (scope, model, revision, prompt_hash, params_fingerprint)
    cache_key: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(64), default="global")
    model: Mapped[str] = mapped_column(String(256), index=True)
    model_revision: Mapped[str | None] = mapped_column(String(128), nullable=True)
    prompt_hash: Mapped[str] = mapped_column(String(64))
    params_fingerprint: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    hits: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    last_hit_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)


class EvalRun(Base):
    """One `llmctl eval` run; resumable from its samples."""

    __tablename__ = "eval_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(256))
    # Identifies "the same run" for resuming: task, model, data, options.
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    config: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="running")
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # The suite run this run belongs to (`llmctl eval suite`), if any.
    suite_run_id: Mapped[str | None] = mapped_column(
        ForeignKey("eval_suite_runs.id", ondelete="SET NULL"), nullable=True, index=True)


class EvalSuiteRun(Base):
    """One `llmctl eval suite FILE.yaml` run: its task runs point at it."""

    __tablename__ = "eval_suite_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    # The suite file's content and models: what `--resume` and `--baseline last` match on.
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    config: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="running")
    results: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # gates and summary
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class EvalSample(Base):
    """One scored item of an eval run."""

    __tablename__ = "eval_samples"
    __table_args__ = (UniqueConstraint("run_id", "item_index", name="uq_eval_samples_run_item"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True)
    item_index: Mapped[int] = mapped_column(Integer)
    doc_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    extracted: Mapped[str | None] = mapped_column(Text, nullable=True)
    target: Mapped[str | None] = mapped_column(Text, nullable=True)
    scores: Mapped[dict] = mapped_column(JSON)
    extra: Mapped[dict | None] = mapped_column(JSON, nullable=True)
