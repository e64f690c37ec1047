"""The step API agent authors touch: the Agent base class, the step context and its tool ledger."""
