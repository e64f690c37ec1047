"""Base classes: every model that crosses a process boundary is frozen and strict."""

from pydantic import BaseModel, ConfigDict


class Wire(BaseModel):
    """A value that travels between processes (stream, Pub/Sub, JSON files).

    Frozen so a received value cannot drift from what was recorded; unknown
    fields are rejected so a producer/consumer mismatch fails loudly.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
