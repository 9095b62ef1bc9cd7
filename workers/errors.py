"""The one exception a job raises for a client-caused failure, in OpenAI's error shape.

It is the shared `schemas.openai_errors.OpenAIError` (status, message, type, param, code), named
for what it means here: the task layer answers it with its status and error object. Anything else
a job raises is the server's fault and becomes a 500.
"""

from __future__ import annotations

from schemas.openai_errors import OpenAIError

JobError = OpenAIError

__all__ = ["JobError"]
