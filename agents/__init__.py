"""The built-in customer-support agents, their tools, sample data and the ``Ticket`` input.

Installed as ``orchestrator.agents``; the runtime itself never imports it.
"""
