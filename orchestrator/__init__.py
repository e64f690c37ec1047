"""Durable multi-agent workflows on Redis (speed) and Postgres (truth)."""

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.context import StepContext, current
from orchestrator.errors import AgentError, OrchestratorError, ToolError, ToolNotApplied
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from orchestrator.worker import Worker

__all__ = [
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
