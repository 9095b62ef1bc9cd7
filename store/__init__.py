"""The Redis data model, apart from Celery: jobs, job events, batches, files, heartbeats, metrics, dead letters.

The API and the workers' Celery tasks read and write the same keys through these modules; none of
them imports Celery or a task module, so anything may use them without pulling in the worker.
"""
