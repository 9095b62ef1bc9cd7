"""Files that travel with a job: uploads coming in, generated files going out.

Workers see bytes, never where they were kept: the task layer fetches uploads (kept in Redis
by the API) into `UploadedFile`s before a job runs, and stores every `FileOutput` left in a
result (as the generated-files store, served by the API under an unguessable name) after it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UploadedFile:
    """A multipart file part of the request, e.g. `file` of a transcription or `image` of an edit."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class FileOutput:
    """A file a job produced for a `url` response: replaced by its URL before the result is sent."""

    data: bytes
    media_type: str  # e.g. image/png
    extension: str  # e.g. png, without the dot
