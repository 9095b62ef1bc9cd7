"""`POST /v1/chat/completions` and `POST /v1/completions`: queued text generation."""

from __future__ import annotations

from api import model_jobs


def create_chat_completion(call):
    return model_jobs.run("chat", call.body, stream=bool(call.body.get("stream")))


def create_completion(call):
    return model_jobs.run("completion", call.body, stream=bool(call.body.get("stream")))


HANDLERS = {"createChatCompletion": create_chat_completion, "createCompletion": create_completion}
