"""Shared pytest fixtures: real PostgreSQL, test models, live `llmctl serve` processes."""
