"""The engine: workers, the step protocol, the reconciler, timers and schedules.

With the client, the only place that joins the Redis side and the Postgres side.
"""
