"""Prints the fault suite's table (scenario, workflows, completed, ...) after the run."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault.servers import PostgresServer, RedisServer
from tests.fault.toolserver import run_toolserver


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.fault.harness import ROWS

    if not ROWS:
        return
    head = (
        "scenario",
        "workflows",
        "unfinished at fault",
        "completed",
        "dead-lettered",
        "duplicate effects",
        "lost",
        "worker kills",
        "faults",
        "excess attempts",
        "unexpected exits",
        "seconds",
    )
    lines = [head] + [
        (
            r.scenario,
            str(r.workflows),
            "-" if r.unfinished_at_disturbance is None else str(r.unfinished_at_disturbance),
            str(r.completed),
            str(r.dead_lettered),
            str(r.duplicate_effects),
            str(r.lost),
            str(r.crashes),
            str(r.faults),
            str(r.excess_attempts),
            str(r.unexpected_exits),
            f"{r.seconds:.1f}",
        )
        for r in ROWS
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    terminalreporter.section("fault suite")
    for line in lines:
        terminalreporter.write_line(
            " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
        )


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    failed_before = request.session.testsfailed
    tmp = tempfile.mkdtemp(prefix="orch-fault-")
    try:
        with (
            RedisServer() as redis,
            PostgresServer() as pg,
            run_toolserver(Path(tmp)) as tool_url,
        ):
            yield {"redis": redis, "pg": pg, "tool_url": tool_url, "logs": Path(tmp)}
    finally:
        # The worker logs of a module where a scenario failed stay, for the post-mortem
        # (its failure message names the directory).
        if request.session.testsfailed == failed_before:
            shutil.rmtree(tmp, ignore_errors=True)
