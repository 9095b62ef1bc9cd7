"""Images and audio end to end: the `openai` SDK -> API -> queue -> worker (diffusers, faster-whisper,
piper) -> Redis -> API, with the default models (a tiny diffusion pipeline built locally by
`localq models prepare`, Whisper tiny.en and the bundled piper voice), on the session's shared service.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time

import av
import httpx
import pytest
import redis
from openai import BadRequestError, OpenAI
from PIL import Image

from tests import sse
from tests.service import wait_until

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def service(stack):
    """The session's shared service (conftest's `stack`, which prepares the image models)."""
    return stack


@pytest.fixture(scope="module")
def client(service):
    return OpenAI(base_url=service.base_url + "/v1", api_key="unused", timeout=180, max_retries=0)


@pytest.fixture(scope="module")
def store(service):
    with redis.Redis.from_url(service.redis.url, decode_responses=True) as client:
        yield client


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# ----- images ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format,pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_image_b64_in_each_output_format(client, output_format, pil_format):
    result = client.images.generate(prompt="a red square", size="256x256", response_format="b64_json",
                                    output_format=output_format, extra_body={"x-localai-extensions": {"seed": 1}})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == pil_format and image.size == (256, 256)


def test_image_url_is_served_by_localq_and_expires_by_name(client):
    result = client.images.generate(prompt="a blue circle", size="256x256", response_format="url", n=2,
                                    output_format="webp", output_compression=60)
    assert len(result.data) == 2
    for item in result.data:
        assert "/generated/" in item.url
        fetched = httpx.get(item.url, timeout=30)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/webp"
        assert Image.open(io.BytesIO(fetched.content)).size == (256, 256)
    guessed = httpx.get(result.data[0].url.rsplit("/", 1)[0] + "/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.webp")
    assert guessed.status_code == 404


def test_same_seed_same_image(client):
    def make(seed):
        return client.images.generate(prompt="a cat", size="64x64", response_format="b64_json",
                                      extra_body={"x-localai-extensions": {"seed": seed}}).data[0].b64_json

    assert make(5) == make(5) != make(6)


def test_image_generation_batch_matches_synchronous_images(client):
    """A Batch API batch of image generations: each line's picture equals the synchronous one."""
    bodies = [
        {"prompt": "a red square", "size": "256x256", "response_format": "b64_json",
         "x-localai-extensions": {"seed": 7}},
        {"model": "dall-e-2", "prompt": "a blue circle", "size": "256x256", "response_format": "url",
         "x-localai-extensions": {"seed": 8}},
    ]
    lines = "\n".join(json.dumps({"custom_id": f"img-{i}", "method": "POST", "url": "/v1/images/generations",
                                  "body": body}) for i, body in enumerate(bodies))
    source = client.files.create(file=("images.jsonl", lines.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/images/generations", completion_window="24h")
    done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in (
        "completed", "failed", "expired", "cancelled") and b, 120, "the image batch")
    assert done.status == "completed" and done.request_counts.completed == 2, done
    output = {o["custom_id"]: o for o in map(json.loads, client.files.content(done.output_file_id).text.splitlines())}
    for index, body in enumerate(bodies):
        extensions = body["x-localai-extensions"]
        direct = client.images.generate(**{k: v for k, v in body.items() if k not in ("x-localai-extensions",
                                                                                      "response_format")},
                                        response_format="b64_json", extra_body={"x-localai-extensions": extensions})
        expected = base64.b64decode(direct.data[0].b64_json)
        [picture] = output[f"img-{index}"]["response"]["body"]["data"]
        if body["response_format"] == "url":
            fetched = httpx.get(picture["url"], timeout=30)
            assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
            assert fetched.content == expected
        else:
            assert base64.b64decode(picture["b64_json"]) == expected


def test_streamed_image_with_partial_images(client):
    events = list(client.images.generate(prompt="a tree", size="64x64", stream=True, partial_images=2,
                                         extra_body={"x-localai-extensions": {"steps": 4}}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json))).size == (64, 64)


def test_progress_events_in_order_on_the_job_stream(client, service):
    raw = client.images.with_raw_response.generate(prompt="a house", size="64x64",
                                                   extra_body={"x-localai-extensions": {"steps": 6}})
    job_id = raw.headers["x-localq-job-id"]
    text = httpx.get(f"{service.base_url}/v1/jobs/{job_id}/events", timeout=30).text
    progress = [json.loads(event.data) for event in sse.parse(text) if event.event == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 7)) and {p["total_steps"] for p in progress} == {6}


def test_cancelled_image_job_stops_within_one_step(service, store):
    body = {"prompt": "a slow landscape", "size": "512x512", "stream": True,
            "x-localai-extensions": {"steps": 200}}
    with httpx.stream("POST", service.base_url + "/v1/images/generations", json=body, timeout=120) as response:
        job_id = response.headers["x-localq-job-id"]
        wait_until(lambda: any(f["type"] == "progress" for _, f in store.xrange(f"localq:job:{job_id}:events")),
                   60, "the first step")
    # the stream is gone: after the resume grace the job is cancelled and stops at the next step
    record = wait_until(lambda: (r := store.hgetall(f"localq:job:{job_id}"))["status"] == "cancelled" and r, 30,
                        "the cancellation")
    steps = [json.loads(f["data"])["step"] for _, f in store.xrange(f"localq:job:{job_id}:events")
             if f["type"] == "progress"]
    cancel_seen = float(record["finished_at"])
    assert steps[-1] < 200
    time.sleep(1)
    later = [f for _, f in store.xrange(f"localq:job:{job_id}:events") if f["type"] == "progress"]
    assert len(later) == len(steps), "steps kept coming after the job was cancelled"
    assert cancel_seen > 0


def test_image_edit_with_upload_and_mask(client):
    base = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    buffers = []
    for picture in (base, mask):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        buffers.append(buffer.getvalue())
    edited = client.images.edit(image=("in.png", buffers[0], "image/png"), mask=("mask.png", buffers[1], "image/png"),
                                prompt="add a hat", size="64x64", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).size == (64, 64)


# ----- audio ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spoken_wav(client):
    return client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE, response_format="wav").content


@pytest.mark.parametrize("response_format,codec", [("mp3", "mp3"), ("opus", "opus"), ("aac", "aac"), ("flac", "flac"),
                                                   ("wav", "pcm_s16le")])
def test_each_speech_format_decodes_as_its_format(client, response_format, codec):
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.",
                                       response_format=response_format).content
    with av.open(io.BytesIO(audio)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name.startswith(codec)  # FFmpeg decodes mp3 with "mp3float"
        samples = sum(frame.samples for frame in container.decode(stream))
    assert samples > 0.3 * stream.codec_context.sample_rate  # at least ~0.3 s of speech


def test_pcm_speech_is_raw_24khz_16bit(client):
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.", response_format="pcm").content
    assert len(audio) % 2 == 0 and 0.3 < len(audio) / 2 / 24000 < 5


@pytest.mark.parametrize("response_format", ["json", "text", "srt", "vtt", "verbose_json"])
def test_speech_round_trip_through_transcription(client, spoken_wav, response_format):
    extra = {"timestamp_granularities": ["word", "segment"]} if response_format == "verbose_json" else {}
    result = client.audio.transcriptions.create(model="whisper-1", file=("fox.wav", spoken_wav, "audio/wav"),
                                                response_format=response_format, language="en", **extra)
    if response_format == "json":
        text = result.text
    elif response_format == "verbose_json":
        text = result.text
        assert result.segments and result.segments[0].end > result.segments[0].start >= 0
        assert result.words and words(" ".join(w.word for w in result.words)) == words(SENTENCE)
    else:
        text = result if isinstance(result, str) else result.text
        if response_format == "srt":
            assert "-->" in text and text.lstrip().startswith("1")
        if response_format == "vtt":
            assert text.startswith("WEBVTT") and "-->" in text
        text = " ".join(line for line in text.splitlines() if line and "-->" not in line and not line.isdigit()
                        and line != "WEBVTT")
    assert words(text) == words(SENTENCE)


def test_streamed_transcription_deltas_add_up(client, spoken_wav):
    events = list(client.audio.transcriptions.create(model="whisper-1", file=("fox.wav", spoken_wav, "audio/wav"),
                                                     stream=True))
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and deltas.strip() == done[0].text.strip() and words(deltas) == words(SENTENCE)


def test_translation_of_english_audio(client, spoken_wav):
    result = client.audio.translations.create(model="whisper-1", file=("fox.wav", spoken_wav, "audio/wav"))
    assert words(result.text) == words(SENTENCE)


# ----- bad input: 4xx, and the worker stays up ---------------------------------------------------------------


def test_bad_input_gets_openai_shaped_4xx_and_the_worker_stays_up(client, service, spoken_wav):
    url = service.base_url + "/v1"

    def error_of(response):
        body = response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return response.status_code, body["error"]["param"]

    wrong_type = httpx.post(url + "/audio/transcriptions", data={"model": "whisper-1"},
                            files={"file": ("notes.txt", b"just some text", "text/plain")}, timeout=30)
    assert error_of(wrong_type) == (400, "file")
    empty = httpx.post(url + "/audio/transcriptions", data={"model": "whisper-1"},
                       files={"file": ("a.wav", b"", "audio/wav")}, timeout=30)
    assert error_of(empty) == (400, "file")
    oversized = httpx.post(url + "/audio/transcriptions", data={"model": "whisper-1"}, timeout=60,
                           files={"file": ("a.wav", spoken_wav[:44] + b"\0" * (26 * 1024 * 1024), "audio/wav")})
    assert error_of(oversized) == (413, "file")
    corrupt = httpx.post(url + "/audio/transcriptions", data={"model": "whisper-1"}, timeout=60,
                         files={"file": ("a.wav", b"RIFF\0\0\0\0WAVE" + b"\x13" * 2000, "audio/wav")})
    assert corrupt.status_code == 400 and error_of(corrupt)[1] == "file"
    bad_size = httpx.post(url + "/images/generations", json={"prompt": "x", "size": "250x250"}, timeout=30)
    assert error_of(bad_size) == (400, "size")
    bad_voice = httpx.post(url + "/audio/speech", json={"model": "tts-1", "input": "hi", "voice": "nobody"},
                           timeout=30)
    assert error_of(bad_voice) == (400, "voice")
    with pytest.raises(BadRequestError):
        client.images.edit(image=("in.txt", b"not an image", "text/plain"), prompt="x")
    # the worker is still there and answers
    assert client.audio.speech.create(model="tts-1", voice="alloy", input="Still here.", response_format="wav").content


def test_model_libraries_load_only_in_the_pool_process(client, service):
    """CUDA must never be initialised in a process that forks afterwards: a prefork worker's parent
    loads no model library (its pool processes do); a worker with several slots forks no pool
    process at all (its threads run the jobs)."""
    client.images.generate(prompt="x", size="64x64", response_format="b64_json")  # torch is in use by now
    parent = service.workers["cpu"].pid
    argv = open(f"/proc/{parent}/cmdline").read().split("\0")
    children = [int(pid) for pid in open(f"/proc/{parent}/task/{parent}/children").read().split()]

    def mapped(pid: int) -> str:
        return open(f"/proc/{pid}/maps").read()

    if argv[argv.index("--pool") + 1] == "threads":
        assert not children and "libtorch" in mapped(parent)
    else:
        assert children, "no pool process"
        assert "libtorch" not in mapped(parent) and "libcuda" not in mapped(parent)
        assert any("libtorch" in mapped(child) for child in children)
