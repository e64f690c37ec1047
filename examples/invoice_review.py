"""Invoice review: parallel checks, a join, a person's approval, and a payment made once.

    extract ─┬─ policy_check ───┬─ decide ─┬──────────────────────► pay
             └─ duplicate_check ┘  (join)  └─ approval (waits) ──► pay   (or ends: rejected)

``extract`` normalises the invoice and forks into two checks that run in
parallel; ``decide`` (a join) runs once both have ended and rejects the invoice,
pays it, or asks a person when it is large (over ``APPROVAL_LIMIT_EUR``).
``approval`` waits, durably and without holding a worker, for the signal
``approval``; no answer in ``APPROVAL_TIMEOUT`` rejects the invoice. ``pay``
calls a non-idempotent tool under the runtime's idempotency key. No model is
used: every decision is a deterministic rule, so no API key is needed.

    orchestrator --app examples.invoice_review:app worker
    orchestrator --app examples.invoice_review:app submit --pipeline invoice \\
        --input examples/invoice.json
    orchestrator --app examples.invoice_review:app status <workflow-id>     # waiting
    orchestrator --app examples.invoice_review:app signal <workflow-id> approval \\
        '{"ok": true, "by": "dana"}'

Rejecting is ``'{"ok": false, "by": "dana", "note": "not ours"}'``. The bank is a
stand-in held in the worker's memory (``BANK``): swap in your payments provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from orchestrator import Agent, AgentInput, AgentOutput, App, StepContext
from orchestrator.errors import WaitTimedOut

APPROVAL_LIMIT_EUR = Decimal("5000")  # at or above this, a person approves the payment
APPROVAL_TIMEOUT = timedelta(days=2)  # no answer by then: rejected
EUR_PER_UNIT = {"EUR": Decimal("1"), "USD": Decimal("0.92"), "GBP": Decimal("1.17")}
BLOCKED_VENDORS = frozenset({"shady supplies ltd"})
CENT = Decimal("0.01")

app = App("invoices", version="0.1.0")


# ── The input ─────────────────────────────────────────────────────────────────


class InvoiceLine(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = Field(min_length=1)
    quantity: Decimal = Field(gt=0)
    unit_price: Decimal = Field(ge=0)


class Invoice(BaseModel):
    """What ``orchestrator submit --input`` reads (a JSON object, or a list of them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    number: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    amount: Decimal = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    issued: date
    lines: list[InvoiceLine] = Field(min_length=1)


# ── A stand-in bank and the tools that reach it ──────────────────────────────


class Bank:
    """A payments provider in memory. Like real ones, it dedupes on the idempotency key:
    a request repeated with the same key returns the first payment."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0  # pay requests received, repeated ones included
        self.payments: dict[str, dict[str, str]] = {}  # by idempotency key
        self.down = False  # unreachable: every request raises ConnectionError

    def pay(self, key: str, vendor: str, number: str, amount: str, currency: str) -> dict[str, str]:
        self._reachable()
        self.calls += 1
        if key not in self.payments:
            self.payments[key] = {
                "payment_id": f"pay-{len(self.payments) + 1:05d}",
                "vendor": vendor,
                "invoice_number": number,
                "amount": amount,
                "currency": currency,
            }
        return self.payments[key]

    def by_key(self, key: str) -> dict[str, str] | None:
        self._reachable()
        return self.payments.get(key)

    def by_invoice(self, vendor: str, number: str) -> dict[str, str] | None:
        self._reachable()
        return next(
            (
                p
                for p in self.payments.values()
                if p["vendor"] == vendor and p["invoice_number"] == number
            ),
            None,
        )

    def _reachable(self) -> None:
        if self.down:
            raise ConnectionError("the bank is unreachable")


BANK = Bank()


@app.tool
async def find_payment(vendor: str, invoice_number: str) -> dict[str, str] | None:
    """A read: the payment already made for this vendor's invoice number, if any."""
    return BANK.by_invoice(vendor, invoice_number)


async def payment_made(
    vendor: str, invoice_number: str, amount: str, currency: str, idempotency_key: str
) -> dict[str, str] | None:
    """For a pay call in doubt (its worker died mid-call): did the bank take it?"""
    return BANK.by_key(idempotency_key)


@app.tool(idempotent=False, reconcile=payment_made)
async def pay(
    vendor: str, invoice_number: str, amount: str, currency: str, idempotency_key: str
) -> dict[str, str]:
    """Move money. Never repeated blindly: the key is the same on every execution of
    the step, and a call in doubt is settled by ``payment_made``."""
    return BANK.pay(idempotency_key, vendor, invoice_number, amount, currency)


# ── Agent inputs and outputs ─────────────────────────────────────────────────


class Extracted(AgentOutput):
    vendor: str  # normalised: the key the duplicate check and the bank use
    invoice_number: str
    amount: Decimal
    currency: str
    amount_eur: Decimal | None  # None: a currency without a rate
    line_total: Decimal


class CheckResult(AgentOutput):
    passed: bool
    problems: list[str] = Field(default_factory=list)


class Decision(AgentOutput):
    action: Literal["pay", "approve", "reject"]
    reasons: list[str] = Field(default_factory=list)


class Approval(AgentOutput):
    approved: bool
    by: str | None = None
    note: str = ""


class Payment(AgentOutput):
    payment_id: str
    amount: Decimal
    currency: str
    approved_by: str | None


class InvoiceIn(AgentInput):
    invoice: Invoice


class CheckIn(AgentInput):
    invoice: Invoice
    extract: Extracted


class DecideIn(AgentInput):
    invoice: Invoice
    extract: Extracted
    # A join with optional branches: a check that failed for good is missing here and
    # its error is under branch_errors.
    policy_check: CheckResult | None = None
    duplicate_check: CheckResult | None = None
    branch_errors: dict[str, str] = Field(default_factory=dict)


class ApprovalIn(AgentInput):
    invoice: Invoice
    extract: Extracted
    decide: Decision


class PayIn(AgentInput):
    extract: Extracted
    approval: Approval | None = None  # absent when no approval was needed


class ApprovalAnswer(BaseModel):
    """The payload of the ``approval`` signal: ``{"ok": true, "by": "dana"}``."""

    ok: StrictBool
    by: str | None = None
    note: str = ""


# ── The agents ────────────────────────────────────────────────────────────────


@app.agent
class ExtractAgent(Agent[InvoiceIn, Extracted]):
    """Normalises the invoice, then forks into the two checks."""

    name = "extract"
    input_model = InvoiceIn
    output_model = Extracted

    async def run(self, ctx: StepContext, data: InvoiceIn) -> Extracted:
        invoice = data.invoice
        line_total = sum((line.quantity * line.unit_price for line in invoice.lines), Decimal(0))
        rate = EUR_PER_UNIT.get(invoice.currency)
        return Extracted(
            vendor=" ".join(invoice.vendor.split()).lower(),
            invoice_number=invoice.number.strip().upper(),
            amount=invoice.amount,
            currency=invoice.currency,
            amount_eur=None if rate is None else (invoice.amount * rate).quantize(CENT),
            line_total=line_total.quantize(CENT),
        )

    def route(self, output: Extracted) -> Sequence[str]:
        return ["policy_check", "duplicate_check"]  # two branches, in parallel


@app.agent
class PolicyCheck(Agent[CheckIn, CheckResult]):
    name = "policy_check"
    input_model = CheckIn
    output_model = CheckResult

    async def run(self, ctx: StepContext, data: CheckIn) -> CheckResult:
        found = data.extract
        problems: list[str] = []
        if found.vendor in BLOCKED_VENDORS:
            problems.append(f"vendor {data.invoice.vendor!r} is blocked")
        if found.amount_eur is None:
            problems.append(f"currency {found.currency} is not accepted")
        if found.line_total != found.amount.quantize(CENT):
            problems.append(f"lines add up to {found.line_total}, not {found.amount}")
        return CheckResult(passed=not problems, problems=problems)

    def route(self, output: CheckResult) -> Sequence[str]:
        return ["decide"]


@app.agent
class DuplicateCheck(Agent[CheckIn, CheckResult]):
    name = "duplicate_check"
    input_model = CheckIn
    output_model = CheckResult
    tools = ("find_payment",)

    async def run(self, ctx: StepContext, data: CheckIn) -> CheckResult:
        found = data.extract
        paid = await ctx.tool(
            "find_payment", vendor=found.vendor, invoice_number=found.invoice_number
        )
        if paid is None:
            return CheckResult(passed=True)
        return CheckResult(passed=False, problems=[f"already paid as {paid['payment_id']}"])

    def route(self, output: CheckResult) -> Sequence[str]:
        return ["decide"]


@app.agent
class DecideAgent(Agent[DecideIn, Decision]):
    """The join: runs once, after both checks have ended, on both their outputs."""

    name = "decide"
    input_model = DecideIn
    output_model = Decision
    join = True
    optional_branches = True  # a check that failed for good sends the invoice to a person

    async def run(self, ctx: StepContext, data: DecideIn) -> Decision:
        problems = [
            *(data.policy_check.problems if data.policy_check else []),
            *(data.duplicate_check.problems if data.duplicate_check else []),
        ]
        if problems:
            ctx.say(f"Invoice {data.extract.invoice_number} rejected: {'; '.join(problems)}.")
            return Decision(action="reject", reasons=problems)
        reasons = [
            f"{check} did not finish: {error}" for check, error in data.branch_errors.items()
        ]
        amount_eur = data.extract.amount_eur
        if amount_eur is not None and amount_eur >= APPROVAL_LIMIT_EUR:
            reasons.append(f"{amount_eur} EUR is at or over the {APPROVAL_LIMIT_EUR} EUR limit")
        return Decision(action="approve" if reasons else "pay", reasons=reasons)

    def route(self, output: Decision) -> Sequence[str]:
        return {"pay": ["pay"], "approve": ["approval"], "reject": []}[output.action]


@app.agent
class ApprovalAgent(Agent[ApprovalIn, Approval]):
    """Waits for a person's ``approval`` signal. The step parks (no worker held) and
    runs again from its start when the signal comes, so everything before the wait
    must be deterministic."""

    name = "approval"
    input_model = ApprovalIn
    output_model = Approval

    async def run(self, ctx: StepContext, data: ApprovalIn) -> Approval:
        while True:
            try:
                payload = await ctx.wait_for("approval", timeout=APPROVAL_TIMEOUT)
            except WaitTimedOut:
                ctx.say(f"No approval within {APPROVAL_TIMEOUT}: invoice rejected.")
                return Approval(approved=False, note=f"no answer within {APPROVAL_TIMEOUT}")
            answer = _answer(payload)
            if answer is not None:
                verdict = "approved" if answer.ok else "rejected"
                ctx.say(
                    f"Invoice {data.extract.invoice_number} {verdict} by {answer.by or 'someone'}."
                )
                return Approval(approved=answer.ok, by=answer.by, note=answer.note)
            # Unreadable (it stays recorded for this wait): note it and wait again.
            ctx.say(f"Ignored an unreadable approval signal: {payload!r}.")

    def route(self, output: Approval) -> Sequence[str]:
        return ["pay"] if output.approved else []


@app.agent
class PayAgent(Agent[PayIn, Payment]):
    name = "pay"
    input_model = PayIn
    output_model = Payment
    tools = ("pay",)

    async def run(self, ctx: StepContext, data: PayIn) -> Payment:
        found = data.extract
        paid = await ctx.tool(
            "pay",
            vendor=found.vendor,
            invoice_number=found.invoice_number,
            amount=str(found.amount),
            currency=found.currency,
        )
        return Payment(
            payment_id=paid["payment_id"],
            amount=found.amount,
            currency=found.currency,
            approved_by=data.approval.by if data.approval else None,
        )

    def route(self, output: Payment) -> Sequence[str]:
        return []  # the end


def _answer(payload: Any) -> ApprovalAnswer | None:
    try:
        return ApprovalAnswer.model_validate(payload)
    except ValidationError:
        return None


app.pipeline(
    "invoice",
    ["extract", "policy_check", "duplicate_check", "decide", "approval", "pay"],
    input_model=Invoice,
    input_key="invoice",
)
app.validate()
