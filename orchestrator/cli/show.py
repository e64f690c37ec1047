"""``orchestrator show <workflow>``: the whole story of one workflow on one screen.

A tree: the workflow, then each step with its attempts (worker, outcome, duration,
model calls with tokens and cost, tool calls executed or replayed with their keys,
errors with the retry decision), memory recalls and waits; then the signals and the
final output. ``--json`` prints the ``Story`` (``orchestrator.schemas.story``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.text import Text
from rich.tree import Tree

from orchestrator.cli.render import usd
from orchestrator.cli.support import guard, out, run_body
from orchestrator.client import Client
from orchestrator.runtime import Runtime
from orchestrator.schemas.story import (
    ModelSpend,
    Story,
    StoryAttempt,
    StoryStep,
    StoryWait,
)

OUTPUT_CHARS = 4_000  # the final output is cut here on screen (--json has all of it)
_STYLE = {"completed": "green", "failed": "red", "waiting": "yellow", "lost": "red"}


@guard
def show(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(help="workflow id, or its first characters")],
    as_json: Annotated[bool, typer.Option("--json", help="print the story as JSON")] = False,
) -> None:
    """Show the whole story of a workflow (an id or its first characters).

    Steps and their attempts (worker, outcome, duration), tool calls executed or replayed
    with their keys, model calls with tokens and cost, memory recalls, waits and signals,
    errors with their retry decision, and the final output; --json prints it as JSON.
    """

    async def body(runtime: Runtime) -> None:
        client = Client(runtime)
        story = await client.story(await client.resolve(workflow))
        if as_json:
            out.print_json(story.model_dump_json())
            return
        out.print(story_view(story))

    run_body(ctx.find_root().obj, body, migrate=False)


def story_view(story: Story) -> Group:
    """The story as a tree of steps, then its signals and output."""
    tree = Tree(_workflow_label(story))
    for step in story.steps:
        _add_step(tree, step)
    parts: list[Any] = [tree]
    if story.signals:
        parts.append(Text("signals", style="bold"))
        for g in story.signals:
            taken = f"taken by step {g.taken_by_seq}" if g.taken_by_seq is not None else "pending"
            parts.append(
                Text(f"  {g.name} {json.dumps(g.payload)} · sent {_at(g.sent_at)} · {taken}")
            )
    if story.output is not None:
        text = json.dumps(story.output, indent=2, ensure_ascii=False)
        cut = text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS] + "\n… (--json: all)"
        parts += [Text("output", style="bold"), Text(cut)]
    return Group(*parts)


def _workflow_label(story: Story) -> Text:
    w = story.workflow
    label = Text(f"workflow {w.id}", style="bold")
    label.append(f" · {w.status}", style=_STYLE.get(w.status, ""))
    label.append(f" · pipeline {w.pipeline} · tenant {w.tenant_id} · session {w.session_id}")
    label.append(f"\ncreated {_at(w.created_at)}")
    if w.completed_at is not None:
        label.append(f" · finished {_at(w.completed_at)} · {_duration(w.duration_seconds)}")
    label.append(f"\n{_spend(w.model)}")
    if w.pruned:
        label.append("\npruned: attempts, tool calls and events are gone", style="dim")
    if w.error:
        label.append(f"\nerror: {w.error}", style="red")
    return label


def _add_step(tree: Tree, step: StoryStep) -> None:
    label = Text(f"step {step.seq} {step.agent}", style="bold")
    label.append(f" · {step.status}", style=_STYLE.get(step.status, ""))
    label.append(f" · from {step.assigned_by} · attempt {step.attempt}")
    if step.duration_seconds is not None:
        label.append(f" · {_duration(step.duration_seconds)}")
    label.append(f" · {usd(step.cost_usd)}")
    if step.waiting_for:
        label.append(f"\nwaiting for signal {step.waiting_for!r}", style="yellow")
    if step.question:
        label.append(f"\nasks: {step.question}", style="yellow")
    node = tree.add(label)
    for attempt in step.attempts:
        _add_attempt(node, attempt)
    for recall in step.recalls:
        found = ", ".join(
            f"{m.get('kind')} {m.get('id')} ({m.get('score')})" for m in recall.memories
        )
        cached = ", cached" if recall.cached else ""
        node.add(
            Text(
                f"memory recalled {recall.query!r} ({recall.mode}{cached}): "
                f"{len(recall.memories)} found" + (f": {found}" if found else "")
            )
        )
    for wait in step.waits:
        node.add(Text(_wait(wait), style="yellow"))


def _add_attempt(node: Tree, attempt: StoryAttempt) -> None:
    label = Text(f"attempt {attempt.attempt}")
    label.append(f" · {attempt.outcome}", style=_STYLE.get(attempt.outcome, ""))
    if attempt.worker:
        label.append(f" · worker {attempt.worker}")
    if attempt.started_at is not None:
        label.append(f" · started {_at(attempt.started_at)}")
    if attempt.duration_seconds is not None:
        label.append(f" · {_duration(attempt.duration_seconds)}")
    branch = node.add(label)
    if attempt.model.calls:
        branch.add(Text(_spend(attempt.model)))
    for call in attempt.tool_calls:
        line = Text(f"tool {call.tool} ")
        line.append(call.how, style="cyan" if call.how == "replayed" else "")
        line.append(f" · key {call.key} · {call.status}")
        if call.recorded_attempt is not None:
            line.append(f" (recorded by attempt {call.recorded_attempt})")
        if call.error:
            line.append(f" · {call.error}", style="red")
        branch.add(line)
    if attempt.error:
        line = Text(f"error: {attempt.error}", style="red")
        if attempt.decision is not None:
            after = attempt.retry_after_seconds
            when = f" after {after:.2f}s" if attempt.decision == "retried" and after else ""
            line.append(f" → {attempt.decision}{when}", style="bold red")
        branch.add(line)


def _spend(model: ModelSpend) -> str:
    if not model.calls:
        return f"model: no calls · {usd(model.cost_usd)}"
    return (
        f"model {model.model}: {model.calls} call(s), {model.prompt_tokens:,} prompt + "
        f"{model.completion_tokens:,} completion tokens · {usd(model.cost_usd)}"
    )


def _wait(wait: StoryWait) -> str:
    if wait.kind == "woken":
        return f"woken {_at(wait.at)} by {wait.by}"
    what = []
    if wait.question:
        what.append(f"a reply to {wait.question!r}")
    elif wait.signal:
        what.append(f"signal {wait.signal!r}")
    if wait.seconds is not None:
        what.append(f"{'timeout' if what else 'timer'} {wait.seconds:g}s")
    return f"parked {_at(wait.at)} waiting for {', '.join(what) or 'nothing'}"


def _at(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"
