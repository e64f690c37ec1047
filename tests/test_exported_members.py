"""The public API is pinned: changing it is a deliberate act."""

import orchestrator
from orchestrator import schemas


def test_orchestrator_exports() -> None:
    assert orchestrator.__all__ == [
        "Agent",
        "AgentError",
        "AgentInput",
        "AgentOutput",
        "App",
        "Client",
        "OrchestratorError",
        "Runtime",
        "Settings",
        "StepContext",
        "ToolError",
        "ToolNotApplied",
        "Worker",
        "current",
        "open_runtime",
    ]


def test_schemas_exports() -> None:
    assert sorted(schemas.__all__) == schemas.__all__
    assert "TaskEnvelope" in schemas.__all__ and "Ticket" not in schemas.__all__
