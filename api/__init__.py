"""The monitoring service (FastAPI)."""
