"""The HTTP command/query API (FastAPI)."""
