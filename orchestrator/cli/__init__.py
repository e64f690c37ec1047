"""The command line: typer commands, their rendering (rich) and the demo."""
