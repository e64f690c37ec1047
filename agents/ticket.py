"""The customer-support ticket: the input of the support pipeline."""

from __future__ import annotations

from pydantic import Field

from orchestrator.schemas.base import Wire


class Ticket(Wire):
    """One customer request. Its tenant, customer and session route the workflow."""

    tenant_id: str = Field(default="default", min_length=1, max_length=64)
    customer_id: str = Field(min_length=1, max_length=128)
    subject: str = Field(min_length=1, max_length=500)
    body: str = Field(min_length=1, max_length=20_000)
    # Tickets of one customer conversation share a session (and its transcript).
    session_id: str | None = Field(default=None, max_length=128)

    def __str__(self) -> str:
        """What the customer wrote, as the session transcript shows it."""
        return f"{self.subject}\n\n{self.body}"

    @classmethod
    def from_text(cls, text: str) -> Ticket:
        """``orchestrator submit "..."``: a ticket from plain text (an anonymous customer)."""
        return cls(customer_id="anonymous", subject=text[:80], body=text)
