"""The public API is pinned: changing it is a deliberate act."""

import agents
import orchestrator
import schemas


def test_orchestrator_exports() -> None:
    assert orchestrator.__all__ == [
        "AgentError",
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


def test_agents_exports() -> None:
    assert agents.__all__ == ["Agent", "AgentInput", "AgentOutput"]


def test_schemas_exports() -> None:
    assert sorted(schemas.__all__) == schemas.__all__
    assert "TaskEnvelope" in schemas.__all__ and "Ticket" in schemas.__all__
