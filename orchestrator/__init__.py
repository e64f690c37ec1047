"""Durable multi-agent workflows on Redis (speed) and Postgres (truth)."""

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.errors import AgentError, OrchestratorError, ToolError, ToolNotApplied
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext, current

__all__ = [
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
