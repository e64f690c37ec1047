"""`orchestrator submit`, `--wait` and the embedded mode, as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.test_cli import assert_one_line_error, run_cli

APP = ("--app", "tests.cli_app:app")
ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    """The test's Redis, Postgres schema and key prefix, migrated for the test app."""
    assert run_cli(*APP, "migrate", env=cli_env).returncode == 0
    return cli_env


@pytest.fixture
def embedded(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Postgres shared, Redis embedded (REDIS_URL unset): each command has its own."""
    shared = {k: v for k, v in env.items() if k != "REDIS_URL"}
    return {**shared, "ORCHESTRATOR_HOME": str(tmp_path / "home")}


def ids_in(result: subprocess.CompletedProcess[str]) -> list[str]:
    return ID.findall(result.stdout)


def test_long_text_is_text_not_a_path(env: dict[str, str]) -> None:
    text = "My order was charged twice and " + "x" * 300  # longer than a file name may be
    result = run_cli(*APP, "submit", text, env=env)
    assert result.returncode == 0, result.stderr
    assert len(ids_in(result)) == 1
    assert "x" * 100 not in result.stderr  # nothing echoed back


def test_paths_that_are_not_files_are_refused(env: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "tickets"
    folder.mkdir()
    assert_one_line_error(run_cli(*APP, "submit", str(folder), env=env), "is a folder")
    missing = tmp_path / "tickts.json"
    assert_one_line_error(run_cli(*APP, "submit", str(missing), env=env), "no such file")
    assert_one_line_error(run_cli(*APP, "submit", "   ", env=env), "the text is empty")
    assert_one_line_error(run_cli(*APP, "submit", "[]", env=env), "non-empty list")
    # --text takes a path-looking word as text
    forced = run_cli(*APP, "submit", "--text", str(missing), env=env)
    assert forced.returncode == 0 and len(ids_in(forced)) == 1


def test_inline_json_and_json_output(env: dict[str, str]) -> None:
    result = run_cli(*APP, "submit", '[{"text": "one"}, {"text": "two"}]', "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 2


def test_wait_with_no_worker_names_the_workflow(env: dict[str, str]) -> None:
    result = run_cli(*APP, "submit", "hello", "--wait", "--timeout", "1", env=env)
    assert result.returncode == 1
    (wid,) = set(ids_in(result))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not finished after 1s" in lines[0] and wid in lines[0]
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr


def test_wait_exit_codes_and_embedded_input(embedded: dict[str, str]) -> None:
    done = run_cli(*APP, "submit", "hello", "--wait", env=embedded)
    assert done.returncode == 0, done.stderr
    failed = run_cli(*APP, "submit", "fail now", "--wait", env=embedded)
    assert failed.returncode == 3, failed.stderr
    assert "asked to fail" in failed.stdout

    asked = run_cli(*APP, "submit", "ask me", "--wait", env=embedded)
    assert asked.returncode == 4, asked.stderr
    wid = ids_in(asked)[0]
    assert "What is the order number?" in asked.stdout
    assert f"orchestrator input {wid}" in asked.stdout.replace("\n", " ").replace("│", "")

    # Ids are time-ordered: ids made seconds apart share their first ten digits or so.
    prefix = wid[:23]
    status = run_cli(*APP, "status", prefix, "--json", env=embedded)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["status"] == "waiting"
    assert data["steps"][0]["question"] == "What is the order number?"

    # Embedded: nobody else could run it, so `input` runs it here, to the end.
    answered = run_cli(*APP, "input", prefix, "ORD-42", env=embedded)
    assert answered.returncode == 0, answered.stderr
    after = json.loads(run_cli(*APP, "status", wid, "--json", env=embedded).stdout)
    assert after["status"] == "completed"
    assert after["state"]["echo"]["answer"] == "ORD-42"


def test_embedded_watch_needs_an_id(embedded: dict[str, str]) -> None:
    assert_one_line_error(run_cli(*APP, "watch", env=embedded), "set REDIS_URL")
    home = Path(embedded["ORCHESTRATOR_HOME"])
    assert not list(home.glob("redis-*"))  # the embedded Redis left no folder behind


def test_embedded_dlq_retry_runs_the_workflow_here(embedded: dict[str, str]) -> None:
    failed = run_cli(*APP, "submit", "fail now", "--wait", env=embedded)
    assert failed.returncode == 3, failed.stderr
    (wid,) = set(ids_in(failed))
    [letter] = json.loads(run_cli(*APP, "dlq", "list", "--json", env=embedded).stdout)

    # Embedded: nobody else could run the resumed step, so `dlq retry` runs it here. The
    # agent still fails, so the run ends failed again (exit 3) with a second dead letter.
    retried = run_cli(*APP, "dlq", "retry", str(letter["id"]), env=embedded)
    assert retried.returncode == 3, retried.stderr
    assert "running the workflow in-process" in retried.stderr
    status = json.loads(run_cli(*APP, "status", wid, "--json", env=embedded).stdout)
    assert status["status"] == "failed"
    letters = json.loads(run_cli(*APP, "dlq", "list", "--all", "--json", env=embedded).stdout)
    assert [d["workflow_id"] for d in letters] == [wid, wid]
