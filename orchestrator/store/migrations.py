"""Versioned schema migrations: the list index (plus one) is the version.

Applied under an advisory lock, each in its own transaction, so running
``migrate`` twice, or from two processes at once, is a no-op the second time.
"""

from __future__ import annotations

from orchestrator.store import Conn

V1_CORE = """
CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;

CREATE TABLE sessions (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL,
    customer_id text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workflows (
    id           uuid PRIMARY KEY,
    tenant_id    text NOT NULL,
    session_id   text NOT NULL REFERENCES sessions (id),
    pipeline     text NOT NULL,
    status       text NOT NULL
                 CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
    input        jsonb NOT NULL,
    state        jsonb NOT NULL,
    error        text,
    app_version  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz
);
CREATE INDEX workflows_tenant_created ON workflows (tenant_id, created_at DESC);
CREATE INDEX workflows_running ON workflows (updated_at) WHERE status = 'running';

CREATE TABLE messages (
    id          bigserial PRIMARY KEY,
    session_id  text NOT NULL REFERENCES sessions (id),
    tenant_id   text NOT NULL,
    workflow_id uuid REFERENCES workflows (id),
    role        text NOT NULL CHECK (role IN ('customer', 'agent', 'system')),
    author      text NOT NULL,
    content     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_session ON messages (session_id, id);

CREATE TABLE steps (
    id           uuid PRIMARY KEY,
    workflow_id  uuid NOT NULL REFERENCES workflows (id),
    seq          integer NOT NULL,
    agent        text NOT NULL,
    assigned_by  text NOT NULL,
    status       text NOT NULL
                 CHECK (status IN ('queued', 'completed', 'failed', 'cancelled')),
    attempt      integer NOT NULL DEFAULT 1,
    input        jsonb NOT NULL,
    output       jsonb,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    UNIQUE (workflow_id, seq)
);
CREATE INDEX steps_open ON steps (updated_at) WHERE status = 'queued';

CREATE TABLE step_attempts (
    step_id     uuid NOT NULL REFERENCES steps (id),
    attempt     integer NOT NULL,
    worker      text NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('completed', 'failed')),
    error       text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (step_id, attempt)
);

CREATE TABLE checkpoints (
    workflow_id uuid NOT NULL REFERENCES workflows (id),
    seq         integer NOT NULL,
    agent       text NOT NULL,
    state       jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, seq)
);

CREATE TABLE tool_runs (
    idempotency_key text PRIMARY KEY,
    workflow_id     uuid NOT NULL REFERENCES workflows (id),
    step_id         uuid NOT NULL REFERENCES steps (id),
    ordinal         integer NOT NULL,
    tool            text NOT NULL,
    attempt         integer NOT NULL,
    status          text NOT NULL CHECK (status IN ('started', 'succeeded', 'failed')),
    args            jsonb NOT NULL,
    result          jsonb,
    error           text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    UNIQUE (step_id, ordinal)
);

CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    workflow_id uuid NOT NULL REFERENCES workflows (id),
    step_id     uuid,
    type        text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_workflow ON events (workflow_id, id);

CREATE TABLE memories (
    id         bigserial PRIMARY KEY,
    tenant_id  text NOT NULL,
    kind       text NOT NULL,
    key        text NOT NULL,
    content    text NOT NULL,
    metadata   jsonb NOT NULL DEFAULT '{}',
    embedder   text NOT NULL,
    embedding  public.vector(256) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, kind, key)
);
CREATE INDEX memories_embedding ON memories USING hnsw (embedding public.vector_cosine_ops);
"""

V2_RECOVERY = """
-- A retry waits until not_before: the durable schedule (Redis only speeds it up).
ALTER TABLE steps ADD COLUMN not_before timestamptz;
CREATE INDEX steps_stalled ON steps (updated_at) WHERE status = 'queued';
DROP INDEX steps_open;

CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    workflow_id uuid REFERENCES workflows (id),
    step_id     uuid REFERENCES steps (id),
    agent       text NOT NULL,
    reason      text NOT NULL,
    envelope    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retried_at  timestamptz
);
CREATE INDEX dead_letters_open ON dead_letters (created_at) WHERE retried_at IS NULL;
"""

V3_MODEL_USAGE = """
-- Which model a step attempt used, how often, and the tokens it spent.
ALTER TABLE step_attempts
    ADD COLUMN model text,
    ADD COLUMN model_calls integer NOT NULL DEFAULT 0,
    ADD COLUMN prompt_tokens integer NOT NULL DEFAULT 0,
    ADD COLUMN completion_tokens integer NOT NULL DEFAULT 0;
"""

V4_HUMAN_INPUT = """
-- A step can park the workflow until a person answers its question.
ALTER TABLE workflows DROP CONSTRAINT workflows_status_check;
ALTER TABLE workflows ADD CONSTRAINT workflows_status_check
    CHECK (status IN ('running', 'waiting', 'completed', 'failed', 'cancelled'));
ALTER TABLE steps DROP CONSTRAINT steps_status_check;
ALTER TABLE steps ADD CONSTRAINT steps_status_check
    CHECK (status IN ('queued', 'waiting', 'completed', 'failed', 'cancelled'));
ALTER TABLE step_attempts DROP CONSTRAINT step_attempts_outcome_check;
ALTER TABLE step_attempts ADD CONSTRAINT step_attempts_outcome_check
    CHECK (outcome IN ('completed', 'failed', 'waiting'));
ALTER TABLE steps ADD COLUMN question text;
ALTER TABLE steps ADD COLUMN replies jsonb NOT NULL DEFAULT '[]';
CREATE INDEX steps_waiting ON steps (workflow_id) WHERE status = 'waiting';
"""

V5_SESSION_ORDER = """
-- One active workflow per customer session; later tickets queue behind it (FIFO).
ALTER TABLE workflows DROP CONSTRAINT workflows_status_check;
ALTER TABLE workflows ADD CONSTRAINT workflows_status_check
    CHECK (status IN ('queued', 'running', 'waiting', 'completed', 'failed', 'cancelled'));
CREATE UNIQUE INDEX workflows_one_active_per_session ON workflows (session_id)
    WHERE status IN ('running', 'waiting');
CREATE INDEX workflows_session_queue ON workflows (session_id, created_at)
    WHERE status = 'queued';
"""

V6_PROMISE = """
-- The fence (attempt: one per execution) and the retry budget (failures) apart.
ALTER TABLE steps ADD COLUMN failures integer NOT NULL DEFAULT 0;
-- A non-idempotent call whose outcome is unknown is 'in_doubt'; a started call
-- belongs to its attempt until its deadline (after it, another attempt may settle it).
ALTER TABLE tool_runs DROP CONSTRAINT tool_runs_status_check;
ALTER TABLE tool_runs ADD CONSTRAINT tool_runs_status_check
    CHECK (status IN ('started', 'succeeded', 'failed', 'in_doubt'));
ALTER TABLE tool_runs ADD COLUMN deadline timestamptz;
-- Idempotent submit: the same key (per tenant) returns the same workflow.
ALTER TABLE workflows ADD COLUMN submit_key text;
CREATE UNIQUE INDEX workflows_submit_key ON workflows (tenant_id, submit_key)
    WHERE submit_key IS NOT NULL;
-- The session check in submit, served by an index instead of a scan.
CREATE INDEX workflows_session_open ON workflows (session_id)
    WHERE status IN ('queued', 'running', 'waiting');
-- Pruning finished workflows' history (the workflow row and its outcome stay).
ALTER TABLE workflows ADD COLUMN pruned_at timestamptz;
CREATE INDEX workflows_prunable ON workflows (completed_at)
    WHERE status IN ('completed', 'failed', 'cancelled') AND pruned_at IS NULL;
-- Unused by any query, and the planner took it for the completion's workflow update.
DROP INDEX workflows_running;
"""

V7_GENERAL_ENGINE = """
-- Parallel branches. Step numbers come from the workflow row (branches never collide);
-- open_steps counts the open (queued, waiting) steps, so the workflow ends when the
-- last branch does; join_step is the join waiting for the open branches, if any.
-- All three change only under the workflow row's lock.
ALTER TABLE workflows
    ADD COLUMN next_seq integer NOT NULL DEFAULT 1,
    ADD COLUMN open_steps integer NOT NULL DEFAULT 1,
    ADD COLUMN join_step uuid;
UPDATE workflows w
SET next_seq = coalesce((SELECT max(seq) + 1 FROM steps s WHERE s.workflow_id = w.id), 1),
    open_steps = (SELECT count(*) FROM steps s
                  WHERE s.workflow_id = w.id AND s.status IN ('queued', 'waiting'));
-- A join is 'pending' until its branches end. A waiting step waits for a signal
-- (waiting_for) or a timer (not_before); waits holds the due time of each durable
-- wait (sleep, wait_for) of the step, by ordinal, so a re-run replays them.
ALTER TABLE steps DROP CONSTRAINT steps_status_check;
ALTER TABLE steps ADD CONSTRAINT steps_status_check
    CHECK (status IN ('pending', 'queued', 'waiting', 'completed', 'failed', 'cancelled'));
ALTER TABLE steps
    ADD COLUMN waiting_for text,
    ADD COLUMN waits jsonb NOT NULL DEFAULT '[]';
CREATE INDEX steps_due ON steps (not_before) WHERE status = 'waiting';

-- Named signals. A signal is kept until a step's wait takes it (step_id, ordinal),
-- so one sent before anyone waits is not lost.
CREATE TABLE signals (
    id          bigserial PRIMARY KEY,
    workflow_id uuid NOT NULL REFERENCES workflows (id),
    name        text NOT NULL,
    payload     jsonb NOT NULL,
    step_id     uuid REFERENCES steps (id),
    ordinal     integer,
    created_at  timestamptz NOT NULL DEFAULT now(),
    taken_at    timestamptz,
    UNIQUE (step_id, ordinal)
);
CREATE INDEX signals_pending ON signals (workflow_id, name, id) WHERE step_id IS NULL;

-- Cron schedules: the last tick submitted, per schedule (the definition is in code).
CREATE TABLE schedules (
    name       text PRIMARY KEY,
    cron       text NOT NULL,
    last_tick  timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

V8_MEMORY = """
-- Long-term memory, curated: facts and summaries per tenant and customer ('' for the
-- whole tenant, as the seeded past tickets), each with its source (workflow, step,
-- message), a confidence, how often it was seen (mentions) and when it was last used.
-- The embedding is that of the embedder named in `embedder`; NULL once the configured
-- dimension changed (memory.ensure_dimension): kept for full text, never compared.
ALTER TABLE memories DROP CONSTRAINT memories_tenant_id_kind_key_key;
ALTER TABLE memories
    ADD COLUMN customer_id     text NOT NULL DEFAULT '',
    ADD COLUMN confidence      real NOT NULL DEFAULT 1.0
                               CHECK (confidence >= 0 AND confidence <= 1),
    ADD COLUMN source_workflow uuid,
    ADD COLUMN source_step     uuid,
    ADD COLUMN source_message  bigint,
    ADD COLUMN mentions        integer NOT NULL DEFAULT 1,
    ADD COLUMN updated_at      timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_used_at    timestamptz,
    ADD COLUMN search          tsvector
                               GENERATED ALWAYS AS (to_tsvector('english', content)) STORED;
ALTER TABLE memories ALTER COLUMN embedding DROP NOT NULL;
CREATE UNIQUE INDEX memories_identity ON memories (tenant_id, customer_id, kind, key);
-- Exact search over a small tenant's rows (recall picks it when the HNSW scan, filtered
-- after the fact, would starve), and the full-text half of hybrid recall.
CREATE INDEX memories_scope ON memories (tenant_id, embedder, customer_id);
CREATE INDEX memories_search ON memories USING gin (search);

-- Transcripts are read back by customer (a returning customer's next ticket).
CREATE INDEX sessions_customer ON sessions (tenant_id, customer_id);

-- Consolidation: a completed workflow of a pipeline that consolidates is distilled into
-- long-term memory once (consolidated_at); the partial index is the durable queue the
-- reconciler rebuilds the Redis stream from.
ALTER TABLE workflows
    ADD COLUMN consolidate     boolean NOT NULL DEFAULT false,
    ADD COLUMN consolidated_at timestamptz;
CREATE INDEX workflows_unconsolidated ON workflows (completed_at)
    WHERE consolidate AND status = 'completed' AND consolidated_at IS NULL;

-- Tenant isolation in storage. The application runs as orchestrator_app (neither owner
-- nor superuser; the pool sets the role on connect). A tenant table's rows are visible
-- to a transaction that set orchestrator.tenant to their tenant (set_config(..., true)).
-- The engine (every tenant's workflows: claims, recovery, pruning) sets
-- orchestrator.engine; it may read and write the workflow tables, write transcripts,
-- and delete (pruning, retention), but reading memories and transcripts always takes
-- the tenant.
DO $$
BEGIN
    CREATE ROLE orchestrator_app NOLOGIN NOSUPERUSER NOBYPASSRLS;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- made by another schema's migration (roles are per cluster)
END
$$;
ALTER TABLE sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE sessions FORCE ROW LEVEL SECURITY;
ALTER TABLE workflows ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflows FORCE ROW LEVEL SECURITY;
ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE messages FORCE ROW LEVEL SECURITY;
ALTER TABLE memories ENABLE ROW LEVEL SECURITY;
ALTER TABLE memories FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON sessions
    USING (tenant_id = current_setting('orchestrator.tenant', true));
CREATE POLICY engine_rows ON sessions
    USING (current_setting('orchestrator.engine', true) = 'on');
CREATE POLICY tenant_rows ON workflows
    USING (tenant_id = current_setting('orchestrator.tenant', true));
CREATE POLICY engine_rows ON workflows
    USING (current_setting('orchestrator.engine', true) = 'on');
CREATE POLICY tenant_rows ON messages
    USING (tenant_id = current_setting('orchestrator.tenant', true));
CREATE POLICY engine_writes ON messages FOR INSERT
    WITH CHECK (current_setting('orchestrator.engine', true) = 'on');
CREATE POLICY engine_deletes ON messages FOR DELETE
    USING (current_setting('orchestrator.engine', true) = 'on');
CREATE POLICY tenant_rows ON memories
    USING (tenant_id = current_setting('orchestrator.tenant', true));
CREATE POLICY engine_deletes ON memories FOR DELETE
    USING (current_setting('orchestrator.engine', true) = 'on');
"""

V9_ERASURE = """
-- Erasure (orchestrator forget): one row per erased customer that holds no personal data:
-- neither the customer id nor a hash of it (a hash of a guessable id is the id), only the
-- tenant, how many rows of each table were deleted or blanked, and when.
CREATE TABLE erasures (
    id        uuid PRIMARY KEY,
    tenant_id text NOT NULL,
    counts    jsonb NOT NULL,
    erased_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE erasures ENABLE ROW LEVEL SECURITY;
ALTER TABLE erasures FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON erasures
    USING (tenant_id = current_setting('orchestrator.tenant', true));
CREATE POLICY engine_rows ON erasures
    USING (current_setting('orchestrator.engine', true) = 'on');

-- Memory retention sweeps every tenant's memories. A DELETE whose WHERE reads a column
-- needs a SELECT policy as well, so engine_deletes alone deletes nothing: the sweep's own
-- transaction (store.prune.prune_memories, nothing else) sets orchestrator.sweep.
CREATE POLICY engine_sweeps ON memories FOR SELECT
    USING (current_setting('orchestrator.sweep', true) = 'memories');
"""

V10_TRACE_CONTEXT = """
-- The W3C traceparent each step's span is started under (the submit span's for the first
-- step, then the span of the step that handed on to it), so an envelope rebuilt from
-- Postgres (a reconciler requeue, resume, a woken wait, a session's next ticket) keeps the
-- workflow's trace. Nullable, no default: adding it rewrites nothing.
ALTER TABLE steps ADD COLUMN traceparent text;
"""

V11_COST = """
-- What model calls cost (USD, exact): per step attempt, summed per workflow by the
-- attempt's own transaction (completion, failure or parking). No index on the workflow's
-- cost: a completion adding to it stays a HOT update; `runs --sort cost` sorts a scan.
ALTER TABLE step_attempts ADD COLUMN cost_usd numeric NOT NULL DEFAULT 0;
ALTER TABLE workflows ADD COLUMN cost_usd numeric NOT NULL DEFAULT 0;

-- Optional per-tenant model budgets. spent_usd is the tenant's running spend, kept by the
-- same statements that add a cost to a workflow (only while the tenant has a budget: no
-- row, no write); set when the budget is first set to what the tenant had spent so far.
CREATE TABLE tenant_budgets (
    tenant_id  text PRIMARY KEY,
    usd        numeric NOT NULL CHECK (usd >= 0),
    spent_usd  numeric NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE tenant_budgets ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_budgets FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON tenant_budgets
    USING (tenant_id = current_setting('orchestrator.tenant', true));
CREATE POLICY engine_rows ON tenant_budgets
    USING (current_setting('orchestrator.engine', true) = 'on');
"""

V12_OPEN_ROWS_BY_WORKFLOW = """
-- Found by benchmarks/explain.py at 1M finished workflows (issue 11). The consolidation
-- requeue counts each unconsolidated workflow's open dead letters: without this it read the
-- whole table once per workflow (1 s a pass at 1M); resume marks them retried by workflow.
CREATE INDEX dead_letters_workflow ON dead_letters (workflow_id) WHERE retried_at IS NULL;
-- A workflow's queued steps (promotion, resume, the reconciler's look at each workflow):
-- without it the planner ANDed (workflow_id, seq) with steps_stalled read whole, every
-- queued step of every workflow. Only queued steps: small, and never on a finished one.
CREATE INDEX steps_queued ON steps (workflow_id) WHERE status = 'queued';
"""

V13_LEANER_STEPS = """
-- WAL per workflow (issue 11). A step alone in its workflow starts from the workflow's
-- state, which the completion (or submission) creating it writes in the same statement
-- and the handing step's checkpoint keeps: its input is NULL instead of one more copy,
-- written on insert and again by the completion's non-HOT update, and readers take
-- coalesce(s.input, w.state). Branch and join steps keep their own input.
ALTER TABLE steps ALTER COLUMN input DROP NOT NULL;
-- A checkpoint holds what its step changed in the state (Agent.state_update), not the
-- whole state a fourth time: in a linear workflow the state after step n is the input
-- state with the changes of steps 0..n applied in order; the latest is workflows.state.
COMMENT ON COLUMN checkpoints.state IS
    'what the step changed in the workflow state (the whole state in rows before V13)';
-- Every read of events is by workflow in id order: that index is the key, and the
-- one on id alone (written for every event, read by nothing) goes.
CREATE UNIQUE INDEX events_workflow_id ON events (workflow_id, id);
ALTER TABLE events DROP CONSTRAINT events_pkey,
    ADD CONSTRAINT events_pkey PRIMARY KEY USING INDEX events_workflow_id;
DROP INDEX events_workflow;
"""

V14_GIVEN_UP_CONSOLIDATIONS = """
-- A consolidation that failed for good (3 open dead letters of the 'consolidation' queue,
-- the consolidator's MAX_FAILURES) stays in workflows_unconsolidated, and the reconciler's
-- scan read and counted every one on each pass (benchmarks/explain.py, 1M finished
-- workflows: 6,534 buffers, 11 ms; 505, 2 ms without them). From now on the last dead
-- letter gives it up (consolidate = false, consolidator.py); this does the same for those
-- given up before.
UPDATE workflows w SET consolidate = false
WHERE w.consolidate AND w.status = 'completed' AND w.consolidated_at IS NULL
  AND (SELECT count(*) FROM dead_letters d
       WHERE d.workflow_id = w.id AND d.agent = 'consolidation' AND d.retried_at IS NULL) >= 3;
"""

V15_STEP_PAGES = """
-- WAL per workflow with 1M finished workflows (issue 11): 58 KiB, not 10, nearly all of
-- it full-page images of steps. A new step row is small (V13), so the free space map sent
-- it to the slack left at the end of some old, full page, a different one for each insert:
-- each was the first change to its page since the checkpoint, logged as the whole 8 KiB
-- page. With room kept on each page, an old full page takes no new row, and a step's
-- completion (a new row version: never HOT, its status is indexed) fits on its own page.
-- 80 was not enough in benchmarks/compare.py (29.9 KiB/wf); 70 gave 11.0.
ALTER TABLE steps SET (fillfactor = 70);
"""

MIGRATIONS: tuple[str, ...] = (
    V1_CORE,
    V2_RECOVERY,
    V3_MODEL_USAGE,
    V4_HUMAN_INPUT,
    V5_SESSION_ORDER,
    V6_PROMISE,
    V7_GENERAL_ENGINE,
    V8_MEMORY,
    V9_ERASURE,
    V10_TRACE_CONTEXT,
    V11_COST,
    V12_OPEN_ROWS_BY_WORKFLOW,
    V13_LEANER_STEPS,
    V14_GIVEN_UP_CONSOLIDATIONS,
    V15_STEP_PAGES,
)

CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
# Serializes concurrent migrators of the same schema; released at commit.
LOCK = "SELECT pg_advisory_xact_lock(hashtext('orchestrator.migrate:' || current_schema()))"
CURRENT_VERSION = "SELECT coalesce(max(version), 0) FROM schema_migrations"
RECORD_VERSION = "INSERT INTO schema_migrations (version) VALUES ($1)"
# Qualified: an unqualified name would fall back to public's table through the search path.
VERSION_TABLE_EXISTS = "SELECT to_regclass(format('%I.schema_migrations', $1::text)) IS NOT NULL"
SCHEMA_EXISTS = "SELECT 1 FROM pg_namespace WHERE nspname = $1"
# After every migration (tables may be new): the application role's rights in this
# schema. Postgres formats the schema name (%I); no name is formatted by Python.
GRANT_APP_ROLE = """
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO orchestrator_app', current_schema());
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I '
                   'TO orchestrator_app', current_schema());
    EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO orchestrator_app',
                   current_schema());
END
$$
"""
APP_ROLE = "orchestrator_app"
PGVECTOR_AVAILABLE = "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"


async def migrate(conn: Conn) -> list[int]:
    """Apply pending migrations; return the versions applied (empty when up to date)."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute(LOCK)
        await conn.execute(CREATE_VERSION_TABLE)
        current: int = await conn.fetchval(CURRENT_VERSION)
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            await conn.execute(sql)
            await conn.execute(RECORD_VERSION, version)
            applied.append(version)
        await conn.execute(GRANT_APP_ROLE)
    return applied


async def schema_exists(conn: Conn, schema: str) -> bool:
    """Whether the Postgres schema ``schema`` exists."""
    return await conn.fetchval(SCHEMA_EXISTS, schema) is not None


async def schema_version(conn: Conn, schema: str) -> int:
    """The applied version in ``schema``, 0 when it has never been migrated there."""
    exists = await conn.fetchval(VERSION_TABLE_EXISTS, schema)
    if not exists:
        return 0
    version: int = await conn.fetchval(CURRENT_VERSION)
    return version


async def pgvector_available(conn: Conn) -> bool:
    """Whether the server offers the pgvector extension (installed or only installable)."""
    return await conn.fetchval(PGVECTOR_AVAILABLE) is not None
