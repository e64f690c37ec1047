"""CLI errors: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.settings import Settings


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"REDIS_URL", "DATABASE_URL", "OPENAI_API_KEY"}
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("orchestrator: error:")
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_unreachable_redis(cli_env: dict[str, str]) -> None:
    result = run_cli("migrate", env={**cli_env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert_one_line_error(result, "Redis unavailable")


def test_unreachable_postgres(settings: Settings) -> None:
    assert settings.redis_url
    result = run_cli(
        "migrate",
        env={
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        },
    )
    assert_one_line_error(result, "Postgres unavailable")


def test_password_is_not_echoed(settings: Settings) -> None:
    assert settings.redis_url
    result = run_cli(
        "migrate",
        env={
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": "postgresql://u:s3cret@127.0.0.1:1/db",
        },
    )
    assert_one_line_error(result, "u:***@")
    assert "s3cret" not in result.stderr


def test_postgres_without_pgvector(settings: Settings) -> None:
    url = os.environ.get(
        "ORCHESTRATOR_TEST_PLAIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    probe = run_cli(
        "--debug", "migrate", env={"DATABASE_URL": url, "REDIS_URL": settings.redis_url or ""}
    )
    if "unavailable: " in probe.stderr and "pgvector" not in probe.stderr:
        pytest.skip(f"no plain Postgres without pgvector at {url}")
    assert_one_line_error(
        run_cli("migrate", env={"DATABASE_URL": url, "REDIS_URL": settings.redis_url or ""}),
        "pgvector extension is not installed",
    )


def test_bad_app_path() -> None:
    assert_one_line_error(
        run_cli("--app", "no_such_module:app", "migrate"),
        "cannot import app module 'no_such_module'",
    )
    assert_one_line_error(run_cli("--app", "missing-colon", "migrate"), "module:attr")
    assert_one_line_error(
        run_cli("--app", "orchestrator.settings:Settings", "migrate"), "is not an orchestrator App"
    )


def test_invalid_ticket_json(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"customer_id": "c1", "subject": ')
    assert_one_line_error(run_cli("submit", str(broken)), "is not valid JSON")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"customer_id": "c1", "subject": "s", "body": "b", "priority": 1}')
    assert_one_line_error(run_cli("submit", str(wrong)), "does not fit Ticket (priority")


def test_bad_workflow_id() -> None:
    # Refused before anything connects, as a usage error.
    result = run_cli("status", "not-a-uuid")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("orchestrator: usage error:")
    assert "not a workflow id" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_workflow(cli_env: dict[str, str]) -> None:
    env = cli_env
    assert run_cli("migrate", env=env).returncode == 0
    assert_one_line_error(
        run_cli("status", "00000000-0000-0000-0000-000000000000", env=env), "no workflow 00000000"
    )


def test_runs_dlq_and_input_verbs(cli_env: dict[str, str]) -> None:
    assert run_cli("migrate", env=cli_env).returncode == 0
    listed = run_cli("runs", "--limit", "5", env=cli_env)
    assert listed.returncode == 0 and "workflow" in listed.stdout
    assert run_cli("dlq", "list", env=cli_env).returncode == 0
    assert_one_line_error(run_cli("dlq", "show", "999", env=cli_env), "no dead letter 999")
    assert_one_line_error(
        run_cli("input", "00000000-0000-0000-0000-000000000000", "ORD-1", env=cli_env),
        "no workflow 00000000",
    )
    assert run_cli("runs", "--status", "bogus", env=cli_env).returncode == 2  # usage error
