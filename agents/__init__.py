"""The Agent base class and the built-in customer-support agents."""

from agents.base import Agent, AgentInput, AgentOutput

__all__ = ["Agent", "AgentInput", "AgentOutput"]
