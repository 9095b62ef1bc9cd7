"""Celery tasks that run model work off the request path (added in a later stage)."""
