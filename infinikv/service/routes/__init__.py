"""The HTTP API, one router per resource: completions (chat and text), sessions with their
documents, ingestion jobs, models, health and metrics."""
