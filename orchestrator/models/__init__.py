"""Language models (OpenAI-compatible or offline) and embedders."""
