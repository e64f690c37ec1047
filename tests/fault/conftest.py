"""Prints the fault suite's table (scenario, workflows, completed, ...) after the run."""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.fault.test_faults import ROWS

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
