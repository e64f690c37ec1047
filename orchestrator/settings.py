"""Settings from the environment (``REDIS_URL``, ``DATABASE_URL``, ``ORCHESTRATOR_*``)."""

from decimal import Decimal
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path(platformdirs.user_data_dir("orchestrator", appauthor=False))


class ModelPrice(BaseModel):
    """A model's price in USD per million tokens: ``input`` (prompt) and ``output``
    (completion)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)


class Settings(BaseSettings):
    """Unset URLs mean "start the embedded servers" (see ``orchestrator.embedded``)."""

    model_config = SettingsConfigDict(
        env_prefix="ORCHESTRATOR_", extra="ignore", frozen=True, populate_by_name=True
    )

    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "ORCHESTRATOR_REDIS_URL")
    )
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "ORCHESTRATOR_DATABASE_URL")
    )
    openai_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "ORCHESTRATOR_OPENAI_API_KEY")
    )
    openai_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_BASE_URL", "ORCHESTRATOR_OPENAI_BASE_URL"),
    )
    openai_model: str = "gpt-4o-mini"
    openai_max_retries: int = Field(default=3, ge=0)
    openai_timeout_seconds: float = Field(default=60.0, gt=0)
    app: str = "orchestrator.agents.support:app"
    key_prefix: str = Field(default="orch", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    # Postgres schema holding the tables; tests use one schema per test.
    db_schema: str = Field(default="public", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    home: Path = Field(default_factory=_default_home)
    lease_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # A workflow stops with StepLimitReached past this many steps (a routing loop).
    max_steps: int = Field(default=100, ge=1)
    status_ttl_seconds: int = Field(default=300, ge=1)
    pool_size: int = Field(default=10, ge=1)
    block_ms: int = Field(default=1000, ge=1)
    # Unset: INFO for `orchestrator worker` (takeovers, leadership: rare lines an operator
    # wants), WARNING for every other command.
    log_level: str | None = None
    # One line per event: text, or a JSON object (orchestrator.logs).
    log_format: Literal["text", "json"] = "text"
    # Telemetry (orchestrator.telemetry): where metrics and spans go; none by default.
    # Metrics: console, otlp (the [otlp] extra; OTEL_EXPORTER_OTLP_* say where), or
    # prometheus (a scrape endpoint served by workers on metrics_host:metrics_port).
    metrics_exporter: Literal["none", "console", "otlp", "prometheus"] = "none"
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=9464, ge=1, le=65535)
    # How often console and otlp metrics are exported.
    metrics_interval_seconds: float = Field(default=60.0, gt=0)
    # Spans: console, otlp (the [otlp] extra), or file (JSON lines appended to traces_file).
    traces_exporter: Literal["none", "console", "otlp", "file"] = "none"
    traces_file: Path | None = None
    retry_base_seconds: float = Field(default=0.5, gt=0)
    retry_cap_seconds: float = Field(default=30.0, gt=0)
    # An open step with no progress for this long is re-enqueued from Postgres.
    stall_seconds: float | None = Field(default=None, gt=0)
    reconcile_interval_seconds: float = Field(default=5.0, gt=0)
    # A step this process's submit or completion just created runs without its open read
    # for this long after the commit (orchestrator.store.read_ahead); 0: every step is read.
    read_ahead_seconds: float = Field(default=1.0, ge=0)
    # How often each worker wakes due timers (sleeps, wait timeouts) from Postgres.
    timer_interval_seconds: float = Field(default=1.0, gt=0)
    # Worker liveness: each worker refreshes a key with this TTL every third of it;
    # a worker whose key lapsed is dead (or paused) and its steps are taken over.
    worker_ttl_seconds: float = Field(default=3.0, gt=0)
    # Every Postgres statement and Redis command is bounded by this (a black hole
    # is detected in seconds, never a hang).
    pg_timeout_seconds: float = Field(default=10.0, gt=0)
    redis_timeout_seconds: float = Field(default=5.0, gt=0)
    # A non-idempotent tool call must finish within this, or it is in doubt.
    tool_timeout_seconds: float = Field(default=30.0, gt=0)
    # The reconciler prunes finished workflows older than this (unset: never).
    prune_after_days: float | None = Field(default=None, gt=0)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    # Per-tenant model-call rate limit (token bucket); unset means unlimited.
    model_rate_per_second: float | None = Field(default=None, gt=0)
    model_burst: float = Field(default=10.0, ge=1)
    model_rate_max_wait_seconds: float = Field(default=10.0, ge=0)
    # Model prices in USD per million tokens, as JSON: {"gpt-4o-mini": {"input": 0.15,
    # "output": 0.60}}. Merged over the defaults (orchestrator.models.pricing); a model
    # in neither costs 0 (logged once).
    model_prices: dict[str, ModelPrice] = Field(default_factory=dict)
    # Memory. Embeddings: the offline lexical embedder unless embedding_model is set
    # (any OpenAI-compatible /embeddings endpoint, at OPENAI_BASE_URL); the memories
    # table follows embedding_dimensions.
    embedding_model: str | None = None
    embedding_dimensions: int = Field(default=256, ge=1, le=2000)
    # Working memory of a session in Redis: its TTL and its size cap (bytes).
    working_memory_ttl_seconds: int = Field(default=86_400, ge=1)
    working_memory_max_bytes: int = Field(default=20_000, ge=1_000)
    # Recalled memories cached per session in Redis.
    recall_cache_ttl_seconds: int = Field(default=300, ge=1)
    # Recall scans a tenant of at most this many memories exactly (an HNSW scan filtered
    # by tenant afterwards would starve on a small tenant); larger ones use the index.
    recall_exact_limit: int = Field(default=20_000, ge=0)
    # The memory gate: facts below min confidence are dropped; a fact this similar
    # (cosine) to one the customer has is merged into it.
    memory_min_confidence: float = Field(default=0.5, ge=0, le=1)
    memory_merge_similarity: float = Field(default=0.92, gt=0, le=1)
    # Retention and decay: a memory's weight halves every half-life since its last use;
    # the reconciler prunes memories whose decayed confidence fell below the floor, and
    # any older than the retention (unset: kept).
    memory_half_life_days: float = Field(default=90.0, gt=0)
    memory_prune_below: float = Field(default=0.1, ge=0, le=1)
    memory_retention_days: float | None = Field(default=None, gt=0)
    # Fault injection for tests (orchestrator.faults); never set in production.
    crash_at: str | None = None
    crash_after: int = Field(default=3, ge=1)

    @property
    def stall_after(self) -> float:
        """Seconds an open step may go without progress before it is re-enqueued:
        ``stall_seconds``, or twice the lease when that is unset."""
        return self.stall_seconds or 2 * self.lease_seconds
