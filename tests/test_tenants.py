"""Tenants end to end (issue 14): three keys in two projects on the session's shared service.

Keys `a1` and `a2` are members of project alpha, `b` a member of project beta, `owner` an owner
key. Every object one project makes (files, batches and their output, jobs and their event
streams, generated URLs, running jobs in `/v1/workers`) is a 404 to the other project and is left
unchanged by its attempts; keys of the same project share them. The keys are removed at the end,
so the service is open again for the modules that follow.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import redis
import yaml
from openai import NotFoundError, OpenAI

from ops.stack import REPO
from store.api_keys import MEMBER, OWNER
from tests.service import CHAT, EMBEDDINGS, project_keys, wait_until

JOB_HEADER = "x-localq-job-id"
IMAGE = "tiny-diffusion"


@pytest.fixture(scope="module")
def service(stack):
    return stack


@pytest.fixture(scope="module")
def store(service):
    with redis.Redis.from_url(service.redis.url, decode_responses=True) as client:
        yield client


@pytest.fixture(scope="module")
def keys(service, store):
    """{name: secret}"""
    with project_keys(service.base_url, store, {"a1": ("alpha", MEMBER), "a2": ("alpha", MEMBER),
                                                "b": ("beta", MEMBER), "owner": ("ops", OWNER)}) as made:
        yield made


@pytest.fixture(scope="module")
def http(service, keys):
    """An httpx client per key name."""
    clients = {name: httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {secret}"},
                                  timeout=120) for name, secret in keys.items()}
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture(scope="module")
def sdk(service, keys):
    return {name: OpenAI(base_url=service.base_url + "/v1", api_key=secret, timeout=180, max_retries=0)
            for name, secret in keys.items()}


def assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def _batch_file(lines: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": EMBEDDINGS, "input": f"sentence number {i}"}}).encode() + b"\n"
                    for i in range(lines))


def test_files_belong_to_their_project(http):
    a1, a2, b = http["a1"], http["a2"], http["b"]
    created = a1.post("/v1/files", files={"file": ("mine.jsonl", _batch_file(2))}, data={"purpose": "batch"})
    assert created.status_code == 200, created.text
    file_id = created.json()["id"]
    assert file_id in [f["id"] for f in a2.get("/v1/files").json()["data"]], "a key of the same project sees it"
    assert file_id not in [f["id"] for f in b.get("/v1/files").json()["data"]]
    assert file_id not in [f["id"] for f in b.get("/v1/files", params={"purpose": "batch"}).json()["data"]]
    assert_not_found(b.get("/v1/files", params={"after": file_id}))
    assert_not_found(b.get(f"/v1/files/{file_id}"))
    assert_not_found(b.get(f"/v1/files/{file_id}/content"))
    assert_not_found(b.delete(f"/v1/files/{file_id}"))
    assert_not_found(b.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings",
                                                 "completion_window": "24h"}))
    assert a1.get(f"/v1/files/{file_id}/content").content == _batch_file(2), "B's attempts changed nothing"
    deleted = a2.delete(f"/v1/files/{file_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert_not_found(a1.get(f"/v1/files/{file_id}"))


def test_batches_and_their_output_belong_to_their_project(http, sdk):
    a1, a2, b = http["a1"], http["a2"], http["b"]
    file_id = a1.post("/v1/files", files={"file": ("lines.jsonl", _batch_file(3))},
                      data={"purpose": "batch"}).json()["id"]
    batch = a1.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings",
                                         "completion_window": "24h"}).json()
    batch_id = batch["id"]
    assert_not_found(b.get(f"/v1/batches/{batch_id}"))
    assert_not_found(b.post(f"/v1/batches/{batch_id}/cancel"))
    assert batch_id not in [item["id"] for item in b.get("/v1/batches").json()["data"]]
    assert batch_id in [item["id"] for item in a2.get("/v1/batches").json()["data"]]
    done = wait_until(lambda: (found := a2.get(f"/v1/batches/{batch_id}").json())["status"] in
                      ("completed", "failed", "cancelled") and found, 120, "the batch to finish")
    assert done["status"] == "completed", "B's cancel did not reach it"
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    output = done["output_file_id"]
    assert_not_found(b.get(f"/v1/files/{output}/content"))
    assert_not_found(b.get(f"/v1/files/{output}"))
    assert output not in [f["id"] for f in b.get("/v1/files", params={"purpose": "batch_output"}).json()["data"]]
    lines = [json.loads(line) for line in a2.get(f"/v1/files/{output}/content").text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["line-0", "line-1", "line-2"]
    assert output in [f.id for f in sdk["a1"].files.list(purpose="batch_output")]


def test_a_batch_over_its_projects_daily_token_budget_fails(http):
    a1, b, owner = http["a1"], http["b"], http["owner"]
    alpha = {p["name"]: p["id"] for p in owner.get("/v1/organization/projects").json()["data"]}["alpha"]
    limited = owner.post(f"/v1/organization/projects/{alpha}/rate_limits/rl-*",
                         json={"batch_1_day_max_input_tokens": 10})
    assert limited.status_code == 200, limited.text
    try:
        batches = {}
        for name, client in (("a1", a1), ("b", b)):
            file_id = client.post("/v1/files", files={"file": ("big.jsonl", _batch_file(3))},
                                  data={"purpose": "batch"}).json()["id"]
            batches[name] = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings",
                                                             "completion_window": "24h"}).json()["id"]
        final = {name: wait_until(lambda c=client, i=batches[name]: (found := c.get(f"/v1/batches/{i}").json())[
                     "status"] in ("completed", "failed") and found, 120, "the batch to end")
                 for name, client in (("a1", a1), ("b", b))}
        assert final["a1"]["status"] == "failed"
        assert [error["code"] for error in final["a1"]["errors"]["data"]] == ["token_limit_exceeded"]
        assert final["a1"]["request_counts"]["completed"] == 0
        assert final["b"]["status"] == "completed", "another project's budget is its own"
    finally:
        owner.post(f"/v1/organization/projects/{alpha}/rate_limits/rl-*", json={"batch_1_day_max_input_tokens": None})


def test_jobs_and_their_events_belong_to_their_project(http):
    a1, a2, b = http["a1"], http["a2"], http["b"]
    answered = a1.post("/v1/chat/completions", json={"model": CHAT, "max_tokens": 4, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
    assert answered.status_code == 200, answered.text
    job_id = answered.headers[JOB_HEADER]
    assert_not_found(b.get(f"/v1/jobs/{job_id}"))
    assert_not_found(b.get(f"/v1/jobs/{job_id}/events"))
    assert a2.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    replay = a2.get(f"/v1/jobs/{job_id}/events")
    assert replay.status_code == 200 and "event: result" in replay.text


def test_a_running_job_shows_in_workers_only_to_its_project_and_owners(http, keys, service):
    a1, a2, b, owner = http["a1"], http["a2"], http["b"], http["owner"]
    seen: dict[str, str] = {}

    def stream():
        with a1.stream("POST", "/v1/chat/completions", json={
                "model": CHAT, "max_tokens": 400, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}) as response:
            seen["job"] = response.headers[JOB_HEADER]
            for _ in response.iter_lines():
                pass

    def running_ids(client) -> set[str]:
        workers = client.get("/v1/workers").json()["data"]
        return {job["id"] for worker in workers for job in worker["running_jobs"]} | \
            {worker["current_job"] for worker in workers if worker["current_job"]}

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        wait_until(lambda: "job" in seen and seen["job"] in running_ids(a2), 60, "the job to run")
        job_id = seen["job"]
        for_b, for_owner = running_ids(b), running_ids(owner)
        assert job_id in running_ids(a2), "both looks were taken while the job was running"
        assert job_id not in for_b
        assert job_id in for_owner
        assert_not_found(b.get(f"/v1/jobs/{job_id}/events"))
    finally:
        thread.join(timeout=120)
    assert a2.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", "B never reached the stream to cancel it"


def test_responses_belong_to_their_project(http, sdk):
    a1, b = http["a1"], http["b"]
    made = sdk["a1"].responses.create(model=CHAT, input="Hi", max_output_tokens=16)
    for path in (f"/v1/responses/{made.id}", f"/v1/responses/{made.id}/input_items"):
        assert_not_found(b.get(path))
    assert_not_found(b.post(f"/v1/responses/{made.id}/cancel"))
    assert_not_found(b.delete(f"/v1/responses/{made.id}"))
    assert_not_found(b.post("/v1/responses", json={"model": CHAT, "input": "and?", "previous_response_id": made.id}))
    assert http["a2"].get(f"/v1/responses/{made.id}").json()["id"] == made.id, "B's delete changed nothing"
    later = sdk["a2"].responses.create(model=CHAT, input="And?", previous_response_id=made.id, max_output_tokens=16)
    assert later.previous_response_id == made.id, "a key of the same project continues it"
    assert a1.delete(f"/v1/responses/{made.id}").status_code == 200


def test_generated_urls_belong_to_their_project(http, sdk):
    result = sdk["a1"].images.generate(model=IMAGE, prompt="a red square", size="256x256", response_format="url")
    url = result.data[0].url
    assert "/generated/" in url
    assert_not_found(http["b"].get(url))
    assert http["a2"].get(url).status_code == 200
    assert httpx.get(url, headers={"Authorization": "Bearer sk-nobody"}).status_code == 404
    assert httpx.get(url).status_code == 200, "without a key the URL is a capability, as OpenAI's image URLs are"


def test_model_permissions_limit_what_a_project_sees_and_uses(http, sdk):
    a1, b, owner = http["a1"], http["b"], http["owner"]
    projects = {p["name"]: p["id"] for p in owner.get("/v1/organization/projects").json()["data"]}
    alpha = projects["alpha"]
    updated = owner.post(f"/v1/organization/projects/{alpha}/model_permissions",
                         json={"mode": "allow_list", "model_ids": [EMBEDDINGS]})
    assert updated.json() == {"object": "project.model_permissions", "mode": "allow_list", "model_ids": [EMBEDDINGS]}
    try:
        aliases = yaml.safe_load((REPO / "models" / f"{EMBEDDINGS}.yaml").read_text())["aliases"]
        assert [m["id"] for m in a1.get("/v1/models").json()["data"]] == [EMBEDDINGS, *aliases], \
            "the allowed model, under every name it answers to"
        assert_not_found(a1.get(f"/v1/models/{CHAT}"))
        with pytest.raises(NotFoundError) as refused:
            sdk["a1"].chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert refused.value.code == "model_not_found"
        assert sdk["a1"].embeddings.create(model=EMBEDDINGS, input="still allowed").data
        assert CHAT in [m["id"] for m in b.get("/v1/models").json()["data"]], "beta is unaffected"
    finally:
        owner.delete(f"/v1/organization/projects/{alpha}/model_permissions")
    assert CHAT in [m["id"] for m in a1.get("/v1/models").json()["data"]]


def test_admin_operations_need_an_owner_key(http, keys, service):
    a1, owner = http["a1"], http["owner"]
    refused = a1.get("/v1/organization/projects")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_permissions"
    projects = {p["name"]: p for p in owner.get("/v1/organization/projects").json()["data"]}
    assert {"alpha", "beta", "ops"} <= set(projects)
    alpha = projects["alpha"]["id"]
    listed = owner.get(f"/v1/organization/projects/{alpha}/api_keys").json()["data"]
    assert sorted(key["name"] for key in listed) == ["a1", "a2"]
    assert all(key["redacted_value"].startswith("sk-lq-...") and key["object"] == "organization.project.api_key"
               for key in listed)
    assert not any(secret in json.dumps(listed) for secret in keys.values())
    assert_not_found(owner.get("/v1/organization/projects/proj_nope/api_keys"))
    a2_id = next(key["id"] for key in listed if key["name"] == "a2")
    beta = projects["beta"]["id"]
    assert_not_found(owner.delete(f"/v1/organization/projects/{beta}/api_keys/{a2_id}"))
    deleted = owner.delete(f"/v1/organization/projects/{alpha}/api_keys/{a2_id}")
    assert deleted.json() == {"object": "organization.project.api_key.deleted", "id": a2_id, "deleted": True}
    began = time.monotonic()
    assert http["a2"].get("/v1/models").status_code == 401, "a revoked key is refused on the next request"
    assert time.monotonic() - began < 1
    created = owner.post("/v1/organization/projects", json={"name": "gamma"}).json()
    assert created["object"] == "organization.project" and created["status"] == "active"
    archived = owner.post(f"/v1/organization/projects/{created['id']}/archive").json()
    assert archived["status"] == "archived" and archived["archived_at"] >= created["created_at"]
