"""`POST /v1/embeddings`: queued, answered when the worker is done."""

from __future__ import annotations

from api import model_jobs


def create_embedding(call):
    return model_jobs.run("embedding", call.body)


HANDLERS = {"createEmbedding": create_embedding}
