"""Terminal output of workflows (rich): one panel per ticket, a summary line."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any
from uuid import UUID

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from orchestrator.cli.support import ExitCode, out
from orchestrator.schemas import Event, StepStatus, WorkflowRecord, WorkflowStatus
from orchestrator.step.context import INPUT_SIGNAL


def workflow_panel(record: WorkflowRecord) -> Panel:
    """One workflow as a panel: its input, triage, research, other agents' output, the
    reply and any error; green when it completed, red otherwise."""
    state: dict[str, Any] = record.state
    ticket = state.get("ticket")
    if isinstance(ticket, dict):  # the support app's input
        title = (
            f"{ticket.get('subject', '')}  ({ticket.get('tenant_id')}/{ticket.get('customer_id')})"
        )
    else:  # any other pipeline: its input, briefly
        title = f"{record.pipeline}: {json.dumps(state.get('input', record.input))[:120]}"
    parts: list[Any] = [Text(title, style="bold")]
    triage = state.get("triage")
    if triage:
        parts.append(
            Text(
                f"triage:   {triage['category']} · priority {triage['priority']} · "
                f"sentiment {triage['sentiment']} · model {triage['model']}"
            )
        )
    orders, knowledge = state.get("order_lookup"), state.get("knowledge_search")
    if orders or knowledge:
        found = [f"order {o['order_id']} {o['status']}" for o in (orders or {}).get("orders", [])]
        found += [f"missing {m}" for m in (orders or {}).get("missing_orders", [])]
        found += [f"kb {a['id']}" for a in (knowledge or {}).get("articles", [])]
        found += [
            f"past {s['id']} ({s['score']:.2f})"
            for s in (knowledge or {}).get("similar_tickets", [])
        ]
        parts.append(Text("research: " + ("; ".join(found) or "nothing found")))
    elif triage:
        parts.append(Text("research: skipped (triage found nothing to look up)"))
    remembered = state.get("remembered")
    if remembered:
        parts.append(
            Text(
                "memory:   "
                + "; ".join(f"{m['kind']} memory:{m['id']} ({m['score']:.3f})" for m in remembered)
            )
        )
    shown = {
        "ticket",
        "triage",
        "research",
        "remembered",
        "order_lookup",
        "knowledge_search",
        "response",
    }
    for name, value in state.items():
        if name not in shown:  # a custom agent's output
            parts.append(Text(f"{name + ':':<9} {json.dumps(value)[:300]}"))
    response = state.get("response")
    if response:
        parts.append(Text("reply:", style="bold"))
        parts.append(Text(response["reply"]))
        parts.append(Text("cites: " + (", ".join(response["citations"]) or "nothing"), style="dim"))
    if record.error:
        parts.append(Text(f"error: {record.error}", style="red"))
    parts += [Text(line, style="yellow") for line in waiting_lines(record)]
    style = _BORDER.get(record.status, "red")
    return Panel(
        Group(*parts),
        title=f"{record.id} · {record.status.value}",
        border_style=style,
        title_align="left",
    )


_BORDER = {
    WorkflowStatus.COMPLETED: "green",
    WorkflowStatus.WAITING: "yellow",  # not a failure: someone has to answer
    WorkflowStatus.RUNNING: "blue",
    WorkflowStatus.QUEUED: "blue",
}


def waiting_lines(record: WorkflowRecord) -> list[str]:
    """What a waiting workflow waits for, and the command that answers it."""
    lines: list[str] = []
    for step in record.steps:
        if step.status is not StepStatus.WAITING:
            continue
        if step.waiting_for == INPUT_SIGNAL:
            lines.append(f"waiting for input ({step.agent}): {step.question or '(no question)'}")
            lines.append(f"answer with: orchestrator input {record.id} '<your reply>'")
        elif step.waiting_for:
            lines.append(f"waiting for signal {step.waiting_for!r} ({step.agent})")
            lines.append(
                f"send it with: orchestrator signal {record.id} {step.waiting_for} '<json>'"
            )
        if step.not_before is not None:
            lines.append(f"{step.agent} wakes at {step.not_before.isoformat(timespec='seconds')}")
    return lines


def exit_code(records: Sequence[WorkflowRecord]) -> ExitCode:
    """3 when a workflow failed or was cancelled, else 4 when one waits, else 0."""
    if any(r.status in (WorkflowStatus.FAILED, WorkflowStatus.CANCELLED) for r in records):
        return ExitCode.WORKFLOW_FAILED
    if any(r.status is WorkflowStatus.WAITING for r in records):
        return ExitCode.WAITING
    return ExitCode.OK


def print_records(records: Sequence[WorkflowRecord], *, as_json: bool = False) -> None:
    """Workflows as panels, or as one JSON list."""
    if as_json:
        out.print_json(data=[r.model_dump(mode="json") for r in records])
        return
    for record in records:
        out.print(workflow_panel(record))


def steps_table(record: WorkflowRecord, leases: Mapping[UUID, str] | None = None) -> Table:
    """The workflow's steps in order: agent, status, attempt, completion time, and what
    is going on with it (its lease, as Redis has it; its error)."""
    table = Table("seq", "agent", "status", "attempt", "completed at", "now / error")
    for step in record.steps:
        note = (leases or {}).get(step.id, "")
        table.add_row(
            str(step.seq),
            step.agent,
            step.status.value,
            str(step.attempt),
            step.completed_at.isoformat(timespec="milliseconds") if step.completed_at else "",
            step.error or note,
        )
    return table


def runs_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """Workflows as ``runs`` lists them; ids in full (never cut: they are what you type)."""
    table = Table("workflow", "tenant", "pipeline", "status", "created (UTC)", "cost", "error")
    for column, width in ((0, 36), (3, 9), (4, 14)):
        table.columns[column].no_wrap = True
        table.columns[column].min_width = width
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["tenant_id"],
            r["pipeline"],
            r["status"],
            r["created_at"].strftime("%m-%d %H:%M:%S"),
            usd(r["cost_usd"]),
            _one_line(r["error"] or "", 60),
        )
    return table


def event_line(event: Event) -> str:
    """One audit event: its time, type and data, on one line."""
    data = " ".join(
        f"{k}={_one_line(v if isinstance(v, str) else json.dumps(v), 60)}"
        for k, v in event.data.items()
    )
    return f"{event.created_at.isoformat(timespec='milliseconds')}  {event.type.value:<24} {data}"


def ticket_line(record: WorkflowRecord) -> Text:
    """One workflow on one line: id, status, what triage made of it, the reply's start."""
    state: dict[str, Any] = record.state
    ticket = state.get("ticket")
    who = (
        f"{ticket.get('tenant_id')}/{ticket.get('customer_id')}"
        if isinstance(ticket, dict)
        else record.pipeline
    )
    triage = state.get("triage") or {}
    what = f"{triage['category']}/{triage['priority']}" if "category" in triage else ""
    reply = (state.get("response") or {}).get("reply") or record.error or ""
    seconds = (
        f"{(record.completed_at - record.created_at).total_seconds():.2f}s"
        if record.completed_at
        else ""
    )
    line = Text(f"{record.id}  ", style="dim")
    line.append(f"{record.status.value:<9}", style=_BORDER.get(record.status, "red"))
    line.append(f" {who:<18} {what:<18} {seconds:>6}  {_one_line(reply, 70)}")
    return line


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def summary_table(records: Sequence[WorkflowRecord], seconds: float) -> Table:
    """How a batch went: workflows per status, per triage category, latency and rate."""
    table = Table("", "count", title="summary", title_justify="left")
    for status in WorkflowStatus:
        n = sum(r.status is status for r in records)
        if n:
            table.add_row(status.value, str(n))
    categories: dict[str, int] = {}
    for r in records:
        category = (r.state.get("triage") or {}).get("category")
        if category:
            categories[category] = categories.get(category, 0) + 1
    for category, n in sorted(categories.items()):
        table.add_row(f"category {category}", str(n))
    took = sorted(
        (r.completed_at - r.created_at).total_seconds() for r in records if r.completed_at
    )
    if took:
        table.add_row("p50 seconds", f"{took[len(took) // 2]:.2f}")
        table.add_row("max seconds", f"{took[-1]:.2f}")
    table.add_row("wall seconds", f"{seconds:.2f}")
    table.add_row("workflows/s", f"{len(records) / seconds if seconds > 0 else 0.0:.1f}")
    return table


def print_summary(console: Console, records: list[WorkflowRecord], seconds: float) -> None:
    """Print one line: how many tickets completed and failed, wall time, workflows/s."""
    completed = sum(r.status is WorkflowStatus.COMPLETED for r in records)
    rate = len(records) / seconds if seconds > 0 else 0.0
    console.print(
        f"tickets={len(records)} completed={completed} "
        f"failed={len(records) - completed} wall={seconds:.2f}s "
        f"workflows/s={rate:.1f}"
    )


def recognition_line(record: WorkflowRecord) -> str:
    """What research remembered of a returning customer (one line; the pipeline's
    ``remembered`` state, as the support app records it)."""
    remembered = record.state.get("remembered") or []
    ticket = record.state.get("ticket")
    who = ticket.get("customer_id") if isinstance(ticket, dict) else record.session_id
    if not remembered:
        return f"{who}: not recognised (nothing remembered)"
    kinds = ", ".join(f"{m['kind']} memory:{m['id']}" for m in remembered)
    return f"{who}: recognised, recalled {len(remembered)} memories ({kinds})"


def usd(amount: Decimal | float | None) -> str:
    """An amount in USD for a table: ``$12.34`` from a dollar up, else up to six decimals
    (``$0.000185``); ``$0`` for nothing, ``<$0.000001`` for less."""
    value = Decimal(str(amount or 0))
    if value == 0:
        return "$0"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    digits = f"{value:.6f}".rstrip("0").rstrip(".")
    return "<$0.000001" if digits in ("0", "-0") else f"${digits}"
