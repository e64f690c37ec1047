"""The customer-support ticket: the input of the support pipeline."""

from pydantic import Field

from schemas.base import Wire


class Ticket(Wire):
    tenant_id: str = Field(default="default", min_length=1, max_length=64)
    customer_id: str = Field(min_length=1, max_length=128)
    subject: str = Field(min_length=1, max_length=500)
    body: str = Field(min_length=1, max_length=20_000)
    # Tickets of one customer conversation share a session (and its transcript).
    session_id: str | None = Field(default=None, max_length=128)
