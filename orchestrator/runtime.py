"""The runtime bundle: settings, app, clients and model, opened and closed together.

Clients are created here and passed explicitly; nothing is a module-level
singleton configured after import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Tracer, TracerProvider

from orchestrator import tracing
from orchestrator.app import App
from orchestrator.connections import connect_redis, create_pool, pg, redact
from orchestrator.coordination.keys import Keys
from orchestrator.coordination.pipelining import Pipelined
from orchestrator.coordination.ratelimit import RateLimiter
from orchestrator.coordination.recall_cache import RecallCache
from orchestrator.coordination.subscriptions import Subscriptions
from orchestrator.coordination.working_memory import WorkingMemoryCache
from orchestrator.embedded import embedded_postgres, embedded_redis
from orchestrator.errors import ConfigurationError, ServiceUnavailable
from orchestrator.faults import CrashPoints
from orchestrator.metrics import Metrics
from orchestrator.models.embeddings import Embedder, LexicalEmbedder, OpenAIEmbedder
from orchestrator.models.llm import LanguageModel, OfflineModel, OpenAIModel
from orchestrator.models.pricing import Pricing
from orchestrator.settings import Settings
from orchestrator.store import Conn, memory
from orchestrator.store.migrations import (
    MIGRATIONS,
    migrate,
    pgvector_available,
    schema_exists,
    schema_version,
)
from orchestrator.store.operations import Store

# Postgres quotes the identifier itself (%I): no schema name is ever formatted by Python.
CREATE_SCHEMA_SQL = "SELECT format('CREATE SCHEMA IF NOT EXISTS %I', $1::text)"


@dataclass(frozen=True, slots=True)
class Runtime:
    """Settings, app, clients and model of one process, opened and closed together by
    ``open_runtime`` and passed explicitly."""

    settings: Settings
    app: App
    keys: Keys
    redis: aioredis.Redis
    pool: asyncpg.Pool
    model: LanguageModel
    embedder: Embedder
    crash: CrashPoints
    model_limiter: RateLimiter | None = None
    tracer: Tracer = field(default_factory=tracing.tracer)
    metrics: Metrics = field(default_factory=Metrics)  # no-op unless given a meter
    # What model calls cost (the model_prices setting over the defaults).
    pricing: Pricing = field(default_factory=Pricing)
    _store: Store = field(init=False, repr=False, compare=False)
    # Concurrent callers' Redis commands share pipelines (handoffs, lease takes, submits).
    pipelined: Pipelined = field(init=False, repr=False, compare=False)
    # Pub/Sub connections kept subscribed between Client.wait calls.
    subscriptions: Subscriptions = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Frozen: set once, here; both batch concurrent calls, so one per runtime.
        object.__setattr__(self, "_store", Store(self.db, read_ahead_seconds=self._read_ahead()))
        object.__setattr__(self, "pipelined", Pipelined(self.redis))
        object.__setattr__(self, "subscriptions", Subscriptions(self.redis))

    def _read_ahead(self) -> float:
        # Under half the stall time: a reconciler requeue (a new fence) never meets a
        # delivery of the old attempt that is still read ahead.
        return min(self.settings.read_ahead_seconds, self.settings.stall_after / 2)

    def db(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        """A pooled connection, bounded in time; infrastructure failures raise
        ``ServiceUnavailable`` (see ``orchestrator.connections.pg``)."""
        return pg(self.pool, timeout=self.settings.pg_timeout_seconds)

    @property
    def store(self) -> Store:
        """Postgres behind named operations: what the engine and the client call (one per
        runtime: it batches concurrent calls)."""
        return self._store

    @property
    def working_memory(self) -> WorkingMemoryCache:
        """Sessions' working memories in this Redis, with the settings' TTL and byte cap
        (what ``ctx.memory`` reads and appends to)."""
        return WorkingMemoryCache(
            self.redis,
            self.keys,
            ttl_seconds=self.settings.working_memory_ttl_seconds,
            max_bytes=self.settings.working_memory_max_bytes,
        )

    @property
    def recall_cache(self) -> RecallCache:
        """Recall results cached per session in this Redis (``ctx.memory.recall``)."""
        return RecallCache(self.redis, self.keys, self.settings.recall_cache_ttl_seconds)


def build_model(settings: Settings, app: App) -> LanguageModel:
    """The OpenAI model when an API key is set, else the offline model on the app's rules."""
    if settings.openai_api_key:
        from openai import AsyncOpenAI  # half a second to import: only when it is used

        client = AsyncOpenAI(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url or None,
            max_retries=settings.openai_max_retries,  # 429/5xx, honouring Retry-After
            timeout=settings.openai_timeout_seconds,
        )
        return OpenAIModel(client, settings.openai_model)
    return OfflineModel(app.offline_rules)


# Local embedding servers (Ollama, vLLM, text-embeddings-inference) need no key, but the
# client insists on one.
_LOCAL_API_KEY = "unused"


def build_embedder(settings: Settings) -> Embedder:
    """The OpenAI-compatible embedder at ``OPENAI_BASE_URL`` when ``embedding_model`` is set,
    else the offline lexical one; either makes ``embedding_dimensions`` floats."""
    if not settings.embedding_model:
        return LexicalEmbedder(settings.embedding_dimensions)
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        api_key=settings.openai_api_key or _LOCAL_API_KEY,
        base_url=settings.openai_base_url or None,
        max_retries=settings.openai_max_retries,
        timeout=settings.openai_timeout_seconds,
    )
    return OpenAIEmbedder(client, settings.embedding_model, settings.embedding_dimensions)


@contextlib.asynccontextmanager
async def open_runtime(
    settings: Settings,
    app: App,
    *,
    apply_migrations: bool = True,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    redis_required: bool = True,
) -> AsyncIterator[Runtime]:
    """Connect (starting embedded servers for unset URLs), check pgvector, migrate.

    Spans go to ``tracer_provider`` (else the globally configured one); metrics to
    ``meter_provider``, and nowhere without one (``orchestrator.telemetry`` builds both
    from the settings). ``redis_required=False`` opens even while Redis is down (for
    what only reads Postgres: Redis calls then fail as they are made)."""
    with contextlib.ExitStack() as servers:
        redis_url = settings.redis_url or servers.enter_context(
            embedded_redis(settings.home / f"redis-{os.getpid()}")
        )
        database_url = settings.database_url or servers.enter_context(
            embedded_postgres(settings.home / "pg")
        )
        # The embedded database is private to this user: keep it migrated without asking.
        migrate_now = apply_migrations or settings.database_url is None
        await _prepare_database(
            database_url, settings.db_schema, migrate_now, settings.embedding_dimensions
        )
        redis = await connect_redis(
            redis_url,
            timeout=settings.redis_timeout_seconds,
            block_seconds=settings.block_ms / 1000,
            required=redis_required,
        )
        try:
            pool = await create_pool(
                database_url,
                schema=settings.db_schema,
                size=settings.pool_size,
                timeout=settings.pg_timeout_seconds,
            )
        except BaseException:
            await redis.aclose()
            raise
        model = build_model(settings, app)
        embedder = build_embedder(settings)
        keys = Keys(settings.key_prefix)
        runtime: Runtime | None = None
        try:
            runtime = Runtime(
                settings,
                app,
                keys,
                redis,
                pool,
                model,
                embedder,
                CrashPoints(settings.crash_at, settings.crash_after),
                _limiter(settings, redis, keys),
                tracing.tracer(tracer_provider),
                Metrics(meter_provider.get_meter("orchestrator") if meter_provider else None),
                Pricing(settings.model_prices),
            )
            if apply_migrations:
                for hook in app.setup_hooks:
                    await hook(runtime)
            yield runtime
        finally:
            if runtime is not None:
                await runtime.subscriptions.aclose()
            if isinstance(model, OpenAIModel):
                await model.aclose()
            if isinstance(embedder, OpenAIEmbedder):
                await embedder.aclose()
            await pool.close()
            await redis.aclose()


async def _prepare_database(dsn: str, schema: str, apply_migrations: bool, dimensions: int) -> None:
    try:
        conn = await asyncpg.connect(
            dsn, timeout=10, server_settings={"search_path": f"{schema},public"}
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ServiceUnavailable("Postgres", f"{redact(dsn)}: {exc}") from exc
    try:
        if not await pgvector_available(conn):
            raise ServiceUnavailable(
                "Postgres",
                "the pgvector extension is not installed on this server "
                "(use pgvector/pgvector images, or unset DATABASE_URL for the embedded server)",
                retryable=False,
            )
        if apply_migrations:
            await conn.execute(await conn.fetchval(CREATE_SCHEMA_SQL, schema))
            await migrate(conn)
            # The schema follows the configured embedder (as the owner: it alters the table).
            await memory.ensure_dimension(conn, dimensions)
        else:
            if not await schema_exists(conn, schema):
                # The search path would silently fall back to public: refuse instead.
                raise ConfigurationError(
                    f"database schema {schema!r} does not exist: run `orchestrator migrate` "
                    "or check ORCHESTRATOR_DB_SCHEMA"
                )
            version = await schema_version(conn, schema)
            if version < len(MIGRATIONS):
                raise ConfigurationError(
                    f"database schema {schema!r} is at version {version}, this code needs "
                    f"{len(MIGRATIONS)}: run `orchestrator migrate`"
                )
    finally:
        await conn.close()


def _limiter(settings: Settings, redis: aioredis.Redis, keys: Keys) -> RateLimiter | None:
    if settings.model_rate_per_second is None:
        return None
    return RateLimiter(
        redis,
        keys,
        rate=settings.model_rate_per_second,
        burst=settings.model_burst,
        max_wait=settings.model_rate_max_wait_seconds,
    )
