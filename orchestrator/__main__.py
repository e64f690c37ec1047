"""``python -m orchestrator``: the same CLI as the ``orchestrator`` command."""

from orchestrator.cli.main import main

main()
