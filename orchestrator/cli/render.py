"""Terminal output of workflows (rich): one panel per ticket, a summary line."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from orchestrator.schemas import WorkflowRecord, WorkflowStatus


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
    style = "green" if record.status is WorkflowStatus.COMPLETED else "red"
    return Panel(
        Group(*parts),
        title=f"{record.id} · {record.status.value}",
        border_style=style,
        title_align="left",
    )


def steps_table(record: WorkflowRecord) -> Table:
    """The workflow's steps in order: agent, status, attempt, completion time, error."""
    table = Table("seq", "agent", "status", "attempt", "completed at", "error")
    for step in record.steps:
        table.add_row(
            str(step.seq),
            step.agent,
            step.status.value,
            str(step.attempt),
            step.completed_at.isoformat(timespec="milliseconds") if step.completed_at else "",
            step.error or "",
        )
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
