"""Fault-injection harness: private Redis/Postgres servers and a counting tool server."""
