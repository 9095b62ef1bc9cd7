"""`POST /v1/tokenize` and `/v1/detokenize` (LocalAI's): the model's own tokenizer, run by its worker."""

from __future__ import annotations

from api import model_jobs


def tokenize(call):
    return model_jobs.run("tokenize", call.body)


def detokenize(call):
    return model_jobs.run("detokenize", call.body)


HANDLERS = {"tokenize": tokenize, "detokenize": detokenize}
