"""Postgres stores: migrations plus one module per aggregate, SQL as named constants."""
