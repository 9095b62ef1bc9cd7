"""`POST /v1/audio/speech`, `/v1/audio/transcriptions` and `/v1/audio/translations`: queued audio jobs."""

from __future__ import annotations

import json

from flask import Response

from api import model_jobs, uploads
from api.sse import typed_frames
from workers.audio_jobs import SPEECH_CONTENT_TYPES

TEXT_TYPES = {"text": "text/plain", "srt": "text/plain", "vtt": "text/vtt"}


def create_speech(call):
    body = call.body
    if body.get("stream_format") == "sse":
        return model_jobs.run("speech", body, stream=True, frames=typed_frames)
    return model_jobs.stream_audio("speech", body, SPEECH_CONTENT_TYPES[body.get("response_format") or "mp3"])


def _transcript_responder(body: dict):
    """json and verbose_json answer JSON; text, srt and vtt the bare text the worker wrote."""
    mimetype = TEXT_TYPES.get(body.get("response_format") or "json")
    if mimetype is None:
        return model_jobs.json_response

    def respond(raw: str, job_id: str) -> Response:
        return Response(json.loads(raw), mimetype=mimetype, headers=model_jobs.job_headers(job_id))

    return respond


def create_transcription(call):
    body = call.body
    files = uploads.collect(("file",), uploads.AUDIO)
    return model_jobs.run("transcription", body, stream=bool(body.get("stream")), frames=typed_frames, files=files,
                          respond=_transcript_responder(body))


def create_translation(call):
    body = call.body
    files = uploads.collect(("file",), uploads.AUDIO)
    return model_jobs.run("translation", body, files=files, respond=_transcript_responder(body))


HANDLERS = {
    "createSpeech": create_speech,
    "createTranscription": create_transcription,
    "createTranslation": create_translation,
}
