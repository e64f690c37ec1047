"""Runnable examples: sample tickets and custom agents."""
