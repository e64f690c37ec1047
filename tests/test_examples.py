"""The examples run as users run them: routing to a custom agent, crash and resume."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from examples.custom_agent import app as custom_app
from orchestrator.agents.models import TriageInput, TriageResult
from orchestrator.agents.support import sample_tickets
from orchestrator.app import App
from orchestrator.cli.demo import run_local
from orchestrator.client import Client
from orchestrator.errors import ConfigurationError
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent
from tests.conftest import fetch, runtime_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.anyio


@pytest.fixture
async def custom(settings: Settings) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, custom_app) as runtime:
        yield runtime


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "ORCHESTRATOR_KEY_PREFIX": settings.key_prefix,
        "ORCHESTRATOR_DB_SCHEMA": settings.db_schema,
        "PYTHONPATH": str(ROOT),
    }


async def test_angry_tickets_are_routed_through_the_escalation_agent(custom: Runtime) -> None:
    report = await run_local(custom, sample_tickets(), concurrency=4, timeout=60)
    assert report.failed == 0
    routes = {r.state["ticket"]["subject"]: [s.agent for s in r.steps] for r in report.records}
    lookups = ["order_lookup", "knowledge_search"]  # research's parallel branches
    assert routes["THIS IS UNACCEPTABLE"][:3] == ["triage", "escalation", "research"]
    assert sorted(routes["THIS IS UNACCEPTABLE"][3:-1]) == sorted(lookups)
    assert routes["THIS IS UNACCEPTABLE"][-1] == "response"
    assert routes["Question about dark mode"] == [
        "triage",
        "research",
        "knowledge_search",
        "response",
    ]
    pages = await fetch(custom, "SELECT tool, status FROM tool_runs WHERE tool = 'page_on_call'")
    escalated = [r for r in report.records if "escalation" in r.state]
    assert len(pages) == len(escalated) >= 1
    assert all(p["status"] == "succeeded" for p in pages)


async def test_custom_app_runs_under_the_cli_worker(custom: Runtime) -> None:
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--app",
            "examples.custom_agent:app",
            "worker",
            "--concurrency",
            "4",
        ],
        env=cli_env(custom.settings),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        client = Client(custom)
        angry = next(t for t in sample_tickets() if t.subject.isupper())
        wid = await client.submit(None, angry)
        statuses = await client.wait([wid], timeout=60)
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
    assert statuses[wid] is WorkflowStatus.COMPLETED, output.decode()
    agents = [s.agent for s in (await client.get(wid)).steps]
    assert agents[:3] == ["triage", "escalation", "research"] and agents[-1] == "response"
    assert sorted(agents[3:-1]) == ["knowledge_search", "order_lookup"]
    assert worker.returncode == 0  # SIGTERM is a clean stop


def test_a_route_to_an_unknown_agent_fails_at_registration() -> None:
    app = App("broken")

    class Lost(Agent[TriageInput, TriageResult]):
        name = "lost"
        input_model = TriageInput
        output_model = TriageResult
        routes = ("nowhere",)

    app.agent(Lost)
    with pytest.raises(ConfigurationError, match="routes to unknown agent 'nowhere'"):
        app.validate()


async def test_crash_and_resume_example(settings: Settings) -> None:
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "examples/crash_and_resume.py"],
            env=cli_env(settings),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    )
    from tests.conftest import drop_test_data

    await drop_test_data(settings)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker A exited with -9" in result.stdout
    assert "triage ran 1 time(s)" in result.stdout


def test_readme_shows_exactly_the_custom_agent_example() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"## Write your own agent\n.*?```python\n(.*?)```", readme, re.S)
    assert match is not None, "README has no 'Write your own agent' code block"
    assert match.group(1) == (ROOT / "examples" / "custom_agent.py").read_text()
