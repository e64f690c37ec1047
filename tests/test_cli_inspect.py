"""Reading what happened: status, runs, watch, dlq, demo, the entry points, with Redis up
or down, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import anyio
import pytest
import redis.asyncio as aioredis

from orchestrator.coordination.keys import Keys
from orchestrator.coordination.streams import Entry, decode
from orchestrator.errors import InvalidInput
from orchestrator.settings import Settings
from tests.test_cli import assert_one_line_error, run_cli

APP = ("--app", "tests.cli_app:app")
ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DOWN = "redis://127.0.0.1:1/0"  # nothing listens there


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    assert run_cli(*APP, "migrate", env=cli_env).returncode == 0
    return cli_env


def completed_workflow(env: dict[str, str], tmp_path: Path) -> str:
    """A finished workflow, run in-process (an embedded Redis) on the test's schema."""
    embedded = {k: v for k, v in env.items() if k != "REDIS_URL"}
    embedded["ORCHESTRATOR_HOME"] = str(tmp_path / "home")
    result = run_cli(*APP, "submit", "hello there", "--wait", env=embedded)
    assert result.returncode == 0, result.stderr
    return ID.findall(result.stdout)[0]


def test_version_help_and_usage_errors() -> None:
    version = run_cli("--version")
    assert version.returncode == 0
    assert re.fullmatch(r"orchestrator \d+\.\d+\.\d+\s*", version.stdout)
    short_help = run_cli("-h")
    assert short_help.returncode == 0 and "submit" in short_help.stdout
    for args in (["submit", "--bogus"], ["nosuch"], ["runs", "--limit", "x"]):
        result = run_cli(*args)
        assert result.returncode == 2, args
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("orchestrator: usage error:"), lines
        assert "╭" not in result.stderr


def test_dead_letter_reason_names_the_entry_as_text() -> None:
    with pytest.raises(InvalidInput) as caught:
        decode(Entry(id=b"1795265516704-0", fields={b"junk": b"1"}))
    assert "b'" not in str(caught.value)
    assert "1795265516704-0" in str(caught.value) and "junk" in str(caught.value)


def test_watch_a_finished_or_unknown_workflow_ends(env: dict[str, str], tmp_path: Path) -> None:
    wid = completed_workflow(env, tmp_path)
    watched = run_cli(*APP, "watch", wid[:10], env=env, timeout=20)
    assert watched.returncode == 0, watched.stderr
    assert "workflow.submitted" in watched.stdout and "step.completed" in watched.stdout
    assert watched.stdout.strip().endswith(f"{wid}: completed")
    assert_one_line_error(
        run_cli(*APP, "watch", "00000000-0000-0000-0000-00000000000f", env=env, timeout=20),
        "no workflow",
    )


def test_runs_and_status_with_prefixes_json_and_redis_down(
    env: dict[str, str], tmp_path: Path
) -> None:
    wid = completed_workflow(env, tmp_path)
    narrow = {**env, "COLUMNS": "80"}
    table = run_cli(*APP, "runs", env=narrow)
    assert table.returncode == 0 and wid in table.stdout  # never cut at 80 columns
    rows = json.loads(run_cli(*APP, "runs", "--json", env=env).stdout)
    assert [r["id"] for r in rows] == [wid] and rows[0]["status"] == "completed"
    lines = run_cli(*APP, "runs", "-o", "jsonl", env=env).stdout.strip().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [wid]
    assert json.loads(run_cli(*APP, "dlq", "list", "--json", env=env).stdout) == []

    shown = run_cli(*APP, "status", wid[:6], env=env)
    assert shown.returncode == 0 and wid in shown.stdout and "completed" in shown.stdout
    assert_one_line_error(run_cli(*APP, "status", "abcdef01", env=env), "no workflow abcdef01")

    # Postgres holds everything these show: Redis being down does not stop them.
    down = {**env, "REDIS_URL": DOWN}
    for args in (["status", wid], ["runs"], ["watch", wid]):
        result = run_cli(*APP, *args, env=down, timeout=30)
        assert result.returncode == 0, (args, result.stderr)
        assert wid in result.stdout


def test_status_tells_who_holds_an_open_step(env: dict[str, str], settings: Settings) -> None:
    submitted = run_cli(*APP, "submit", "hello", env=env)  # no worker runs: it stays queued
    wid = UUID(ID.findall(submitted.stdout)[0])
    keys = Keys(settings.key_prefix)

    async def hold(owner: str, alive: bool) -> None:
        assert settings.redis_url
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            await client.set(keys.step_lock(wid, 0), f"{owner}|token", px=60_000)
            if alive:
                await client.set(keys.worker_alive(owner), "1", px=60_000)
        finally:
            await client.aclose()

    queued = json.loads(run_cli(*APP, "status", str(wid), "--json", env=env).stdout)
    assert "no worker holds it" in next(iter(queued["leases"].values()))
    anyio.run(hold, "worker-dead", False)
    gone = run_cli(*APP, "status", str(wid), "--json", env=env, timeout=30)
    (note,) = json.loads(gone.stdout)["leases"].values()
    assert note.startswith("its worker worker-dead is gone: another takes it over within")
    text = run_cli(*APP, "status", str(wid), env=env, timeout=30).stdout
    assert "worker-dead" in text and "gone" in text
    anyio.run(hold, "worker-live", True)
    live = json.loads(run_cli(*APP, "status", str(wid), "--json", env=env).stdout)
    assert list(live["leases"].values()) == ["running on worker-live"]


def test_demo_prints_a_line_per_ticket_and_a_summary(env: dict[str, str]) -> None:
    result = run_cli("demo", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    per_ticket = [line for line in lines if ID.match(line)]
    assert len(per_ticket) == 14  # 12 sample tickets and 2 returning customers
    assert "summary" in result.stdout and "workflows/s" in result.stdout
    assert sum("recognised, recalled" in line for line in lines) == 2
    assert "╭" not in result.stdout  # no panels unless --verbose
    assert len(lines) < 60


def test_embedded_postgres_stops_after_a_killed_holder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"ORCHESTRATOR_HOME": str(home)}
    assert run_cli("migrate", env=env, timeout=120).returncode == 0
    # A process that opened the embedded Postgres and was killed never released it.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from orchestrator.embedded import embedded_postgres; "
            "cm = embedded_postgres(Path(sys.argv[1])); cm.__enter__(); "
            "print('up', flush=True); time.sleep(600)",
            str(home / "pg"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert _postmaster_running(home / "pg")
    assert run_cli("runs", env=env, timeout=120).returncode == 0
    deadline = time.monotonic() + 10
    while _postmaster_running(home / "pg") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _postmaster_running(home / "pg")


def _postmaster_running(pgdata: Path) -> bool:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


def test_prune_and_forget_say_how_they_get_on(env: dict[str, str], tmp_path: Path) -> None:
    completed_workflow(env, tmp_path)
    time.sleep(1.1)  # finished over a second ago
    pruned = run_cli(*APP, "prune", "--older-than", "1s", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert "pruning: " in pruned.stderr and "pruned 1 workflow(s)" in pruned.stdout
    forgot = run_cli(
        *APP, "forget", "--tenant", "default", "--customer", "anonymous", "--yes", env=env
    )
    assert forgot.returncode == 0, forgot.stderr
    assert "forgetting: " in forgot.stderr and "erasure " in forgot.stdout


def test_app_module_from_the_current_directory(env: dict[str, str], tmp_path: Path) -> None:
    # The console script (not `python -m`, which puts the directory on the path itself).
    script = Path(sys.executable).parent / "orchestrator"
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "flaky.py").write_text("from tests.cli_app import app\n")
    result = subprocess.run(
        [str(script), "--app", "mypkg.flaky:app", "runs", "--json"],
        cwd=tmp_path,
        env={**os.environ, **env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
