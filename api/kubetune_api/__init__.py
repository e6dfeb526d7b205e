"""kubetune's OpenAI-compatible HTTP API (FastAPI): files, fine-tuning jobs, models.

Routers speak HTTP only, services hold the logic, and backends (Kubernetes custom resources or
the local SQLite store) sit behind one interface. Imports ``kubetune`` and no other component.
"""
