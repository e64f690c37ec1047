"""The app fault tests run in worker subprocesses: three steps, each with a counted effect.

Tools call the counting tool server named by ``FAULT_TOOLSERVER_URL``, which
records every effect per idempotency key in its own process.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import anyio
import anyio.to_thread

from orchestrator.app import App
from orchestrator.errors import ToolNotApplied
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext
from tests.fault.toolserver import (
    NotApplied,
    StaleToken,
    ToolServerError,
    applied_count,
    post_effect,
)

app = App("fault", version="fault-1")


def _server() -> str:
    return os.environ["FAULT_TOOLSERVER_URL"]


@app.tool
async def effect(label: str, idempotency_key: str) -> dict[str, object]:
    """Idempotent: the server applies one effect per key, however often it is called."""
    return await post_effect(_server(), idempotency_key, "idempotent", {"label": label})


async def payment_applied(label: str, idempotency_key: str) -> dict[str, object] | None:
    return {"settled": True} if await applied_count(_server(), idempotency_key) else None


@app.tool(idempotent=False)
async def payment(label: str, idempotency_key: str) -> dict[str, object]:
    """Not idempotent: every call the server receives applies an effect."""
    return await post_effect(_server(), idempotency_key, "plain", {"label": label})


@app.tool(idempotent=False, reconcile=payment_applied)
async def checked_payment(label: str, idempotency_key: str) -> dict[str, object]:
    """Not idempotent, but an in-doubt call can be checked against the server."""
    return await post_effect(_server(), idempotency_key, "plain", {"label": label})


@app.tool(idempotent=False, reconcile=payment_applied)
async def held_payment(label: str, idempotency_key: str) -> dict[str, object]:
    """Not idempotent, checked: the server applies it, then holds the reply
    ``FAULT_HOLD_SECONDS`` (a worker can be paused while the call is in flight)."""
    hold = float(os.environ.get("FAULT_HOLD_SECONDS", "0"))
    return await post_effect(_server(), idempotency_key, "plain", {"label": label}, hold=hold)


def _send_after(base_url: str, body: dict[str, object], delay: float) -> dict[str, object]:
    """Blocking ``POST /effect`` sent ``delay`` seconds from now (in a sender thread)."""
    time.sleep(delay)
    request = urllib.request.Request(
        f"{base_url}/effect",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, object] = json.loads(response.read())
            return result
    except urllib.error.HTTPError as exc:
        reply = json.loads(exc.read() or b"{}")
        error = StaleToken if exc.code == 409 else ToolServerError
        raise error(f"POST /effect: HTTP {exc.code}: {reply}", exc.code, reply) from None


@app.tool(idempotent=False, reconcile=payment_applied)
async def fenced_payment(label: str, idempotency_key: str, fencing_token: int) -> dict[str, object]:
    """Not idempotent, checked, fenced: the server refuses a token below one it has seen.

    The request goes through a sender thread and leaves ``FAULT_SEND_DELAY_SECONDS``
    after the call starts. A caller that gives up (its deadline, a cancellation)
    abandons the wait, not the request: a process paused before its request left
    sends it when it wakes up, late, with its old token.
    """
    body = {
        "key": idempotency_key,
        "kind": "fenced",
        "payload": {"label": label},
        "token": fencing_token,
    }
    delay = float(os.environ.get("FAULT_SEND_DELAY_SECONDS", "0"))
    try:
        return await anyio.to_thread.run_sync(
            _send_after, _server(), body, delay, abandon_on_cancel=True
        )
    except StaleToken as exc:  # refused: the remote certainly did nothing
        raise ToolNotApplied(str(exc)) from exc


@app.tool(idempotent=False)
async def payment_failing_after_apply(
    label: str, idempotency_key: str, fencing_token: int
) -> dict[str, object]:
    """Not idempotent: the first execution's call is applied, then answered HTTP 500."""
    return await post_effect(
        _server(), idempotency_key, "plain", {"label": label}, fail_after_apply=fencing_token == 1
    )


@app.tool(idempotent=False, reconcile=payment_applied)
async def checked_payment_failing_after_apply(
    label: str, idempotency_key: str, fencing_token: int
) -> dict[str, object]:
    """As ``payment_failing_after_apply``, with a reconcile check."""
    return await post_effect(
        _server(), idempotency_key, "plain", {"label": label}, fail_after_apply=fencing_token == 1
    )


@app.tool(idempotent=False)
async def payment_refused_once(
    label: str, idempotency_key: str, fencing_token: int
) -> dict[str, object]:
    """Not idempotent: the first execution's call is refused (HTTP 503, nothing applied)."""
    try:
        return await post_effect(
            _server(),
            idempotency_key,
            "plain",
            {"label": label},
            fail_before_apply=fencing_token == 1,
        )
    except NotApplied as exc:
        raise ToolNotApplied(str(exc)) from exc


@app.tool
async def unreachable(label: str, idempotency_key: str) -> dict[str, object]:
    """A remote that is never reachable: Python's ConnectionError on every call."""
    raise ConnectionError(f"connection refused by the remote for {label} (fault test)")


class Ticket(AgentInput):
    ticket: dict[str, object]


class Step(AgentOutput):
    effect_id: object


def _agent(name: str, tool: str) -> type[Agent[Ticket, Step]]:
    class Worker(Agent[Ticket, Step]):
        input_model = Ticket
        output_model = Step
        tools = (tool,)

        async def run(self, ctx: StepContext, data: Ticket) -> Step:
            # Some work time, so a disturbance lands while many steps are in flight.
            await anyio.sleep(float(os.environ.get("FAULT_STEP_SECONDS", "0")))
            result = await ctx.tool(tool, label=name)
            return Step(effect_id=result.get("effect_id", result.get("settled")))

    return type(f"Fault_{name}", (Worker,), {"name": name})


class Slow(Agent[Ticket, Step]):
    """Sleeps ``FAULT_SLOW_SECONDS`` before its effect: long enough to be paused mid-step."""

    name = "slow"
    input_model = Ticket
    output_model = Step
    tools = ("effect",)

    async def run(self, ctx: StepContext, data: Ticket) -> Step:
        await anyio.sleep(float(os.environ.get("FAULT_SLOW_SECONDS", "0")))
        result = await ctx.tool("effect", label="slow")
        return Step(effect_id=result["effect_id"])


class Outcome(AgentOutput):
    result: dict[str, object]


def _recording_agent(name: str, tool: str) -> type[Agent[Ticket, Outcome]]:
    """One call of ``tool``; its whole result is the step's output (to compare with the ledger)."""

    class Recorder(Agent[Ticket, Outcome]):
        input_model = Ticket
        output_model = Outcome
        tools = (tool,)

        async def run(self, ctx: StepContext, data: Ticket) -> Outcome:
            return Outcome(result=await ctx.tool(tool, label=name))

    return type(f"Fault_{name}", (Recorder,), {"name": name})


class AlwaysRaises(Agent[Ticket, Step]):
    name = "always_raises"
    input_model = Ticket
    output_model = Step

    async def run(self, ctx: StepContext, data: Ticket) -> Step:
        raise RuntimeError("this agent always fails")


app.agent(_agent("first", "effect"))
app.agent(_agent("second", "effect"))
app.agent(_agent("third", "effect"))
app.agent(_agent("pay", "payment"))
app.agent(_agent("checked_pay", "checked_payment"))
app.agent(AlwaysRaises)
app.agent(Slow)
app.pipeline("three", ["first", "second", "third"], input_key="ticket", default=True)
app.pipeline("pay", ["first", "pay"], input_key="ticket")
app.pipeline("pay_only", ["pay"], input_key="ticket")
app.pipeline("checked_pay", ["first", "checked_pay"], input_key="ticket")
app.pipeline("poison", ["always_raises"], input_key="ticket")
app.pipeline("slow", ["slow"], input_key="ticket")
# Outages and stale workers (test_outages.py).
app.agent(_recording_agent("held_pay", "held_payment"))
app.agent(_recording_agent("fenced_pay", "fenced_payment"))
app.agent(_agent("pay_after_apply", "payment_failing_after_apply"))
app.agent(_agent("checked_pay_after_apply", "checked_payment_failing_after_apply"))
app.agent(_agent("pay_refused_once", "payment_refused_once"))
app.agent(_agent("unreachable", "unreachable"))
app.pipeline("held_pay", ["held_pay"], input_key="ticket")
app.pipeline("fenced_pay", ["fenced_pay"], input_key="ticket")
app.pipeline("pay_after_apply", ["pay_after_apply"], input_key="ticket")
app.pipeline("checked_pay_after_apply", ["checked_pay_after_apply"], input_key="ticket")
app.pipeline("pay_refused_once", ["pay_refused_once"], input_key="ticket")
app.pipeline("unreachable", ["unreachable"], input_key="ticket")


# --------------------------------------------------------------------------- branches, waits
# test_branches.py: a fork into three parallel branches and a join; a durable sleep; a
# wait for a signal. Each effect is also counted by the tool server under the tag
# "<workflow id>:<label>", so a second execution of a step under another step number
# (another idempotency key) would still show as a second effect of that label.

BRANCHES = ("fan_a", "fan_b", "fan_c")


@app.tool
async def tagged_effect(label: str, idempotency_key: str) -> dict[str, object]:
    """As ``effect`` (idempotent per key), also counted per (workflow, label)."""
    workflow = idempotency_key.split(":")[0]
    return await post_effect(
        _server(), idempotency_key, "idempotent", {"label": label}, tag=f"{workflow}:{label}"
    )


async def _tagged(ctx: StepContext, label: str) -> object:
    result = await ctx.tool("tagged_effect", label=label)
    return result["effect_id"]


class FanFork(Agent[Ticket, Step]):
    """One effect, then three parallel branches."""

    name = "fan_fork"
    input_model = Ticket
    output_model = Step
    tools = ("tagged_effect",)

    async def run(self, ctx: StepContext, data: Ticket) -> Step:
        return Step(effect_id=await _tagged(ctx, self.name))

    def route(self, output: Step) -> list[str]:
        return list(BRANCHES)


def _branch(name: str) -> type[Agent[Ticket, Step]]:
    class Branch(Agent[Ticket, Step]):
        input_model = Ticket
        output_model = Step
        tools = ("tagged_effect",)

        async def run(self, ctx: StepContext, data: Ticket) -> Step:
            await anyio.sleep(float(os.environ.get("FAULT_STEP_SECONDS", "0")))
            return Step(effect_id=await _tagged(ctx, name))

        def route(self, output: Step) -> list[str]:
            return ["fan_join"]

    return type(f"Fault_{name}", (Branch,), {"name": name})


class BranchOutputs(AgentInput):
    """The join's input: each branch's output, as the merged workflow state holds it."""

    fan_a: dict[str, object] | None = None
    fan_b: dict[str, object] | None = None
    fan_c: dict[str, object] | None = None


class Joined(AgentOutput):
    effect_id: object
    saw: dict[str, object]  # branch -> the effect id in its output, as the join found it


class FanJoin(Agent[BranchOutputs, Joined]):
    """Runs once after every branch ended; records which branch outputs it saw."""

    name = "fan_join"
    input_model = BranchOutputs
    output_model = Joined
    tools = ("tagged_effect",)
    join = True

    async def run(self, ctx: StepContext, data: BranchOutputs) -> Joined:
        saw = {
            branch: output.get("effect_id")
            for branch in BRANCHES
            if (output := getattr(data, branch)) is not None
        }
        return Joined(effect_id=await _tagged(ctx, self.name), saw=saw)


class Nap(Agent[Ticket, Step]):
    """An effect, a durable sleep of ``FAULT_NAP_SECONDS``, another effect."""

    name = "nap"
    input_model = Ticket
    output_model = Step
    tools = ("tagged_effect",)

    async def run(self, ctx: StepContext, data: Ticket) -> Step:
        await _tagged(ctx, "nap_before")
        await ctx.sleep(float(os.environ.get("FAULT_NAP_SECONDS", "2")))
        return Step(effect_id=await _tagged(ctx, "nap_after"))


class Approved(AgentOutput):
    effect_id: object
    approval: object  # the payload of the signal "approval"


class Approve(Agent[Ticket, Approved]):
    """An effect, a durable wait for the signal "approval", another effect."""

    name = "approve"
    input_model = Ticket
    output_model = Approved
    tools = ("tagged_effect",)
    pause_before_wait = 0.0

    async def run(self, ctx: StepContext, data: Ticket) -> Approved:
        await _tagged(ctx, "approve_asked")
        await anyio.sleep(self.pause_before_wait)
        approval = await ctx.wait_for("approval")
        return Approved(effect_id=await _tagged(ctx, "approve_done"), approval=approval)


class ApproveLate(Approve):
    """As ``approve``, a second late to its wait: a signal sent meanwhile is kept for it."""

    name = "approve_late"
    pause_before_wait = 1.0


app.agent(FanFork)
for _name in BRANCHES:
    app.agent(_branch(_name))
app.agent(FanJoin)
app.agent(Nap)
app.agent(Approve)
app.agent(ApproveLate)
app.pipeline("fanout", ["fan_fork", *BRANCHES, "fan_join"], input_key="ticket")
app.pipeline("nap", ["nap"], input_key="ticket")
app.pipeline("approve", ["approve"], input_key="ticket")
app.pipeline("approve_late", ["approve_late"], input_key="ticket")
app.validate()
