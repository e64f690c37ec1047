"""The Redis side: keys, streams, locks, live status, rate limits, delayed delivery.

Speed and coordination only; Postgres is the truth.
"""
