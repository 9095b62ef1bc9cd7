"""Redis Sentinel failover in the middle of a 200-line batch and a streaming chat.

Real processes: a primary, a replica and three sentinels (`tests.sentinel_cluster`), the API and a
CPU worker given `LOCALQ_REDIS_URL=sentinel://...`. The primary is SIGKILLed while the batch runs
and a chat streams. What must hold:

- the API answers only 200 or 503 meanwhile, and 503 only inside the failover window (from the
  kill until the sentinels have promoted the replica, plus `RECONNECT_GRACE` for clients to find it);
- workers and API reconnect on their own: nothing is restarted;
- the batch completes with every line in its output exactly once;
- the stream either ends with `[DONE]`, its text identical to the same request asked again after
  the failover (temperature 0), or with an in-stream error: never cut short silently.
"""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest
import redis

from store.batches import batch_key, lines_key, results_key
from tasks.runtime import connect
from tasks.settings import QueueSettings
from tests.sentinel_cluster import SentinelCluster
from tests.service import Service, only_models, wait_until

CHAT = "smollm2-135m-instruct"
LINES = 200
RECONNECT_GRACE = 3.0  # seconds after the promotion in which a 503 may still be answered
FINAL = {"completed", "failed", "expired", "cancelled"}
STREAM_BODY = {"model": "gpt-4o-mini", "max_tokens": 200, "temperature": 0, "seed": 7,
               "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
               "x-localai-extensions": {"ignore_eos": True}}


@pytest.fixture()
def stack(tmp_path):
    with SentinelCluster(tmp_path / "sentinel") as cluster:
        env = {**os.environ, "LOCALQ_REDIS_URL": cluster.url, "PYTHONUNBUFFERED": "1",
               "LOCALQ_FILES_DIR": str(tmp_path / "files"), "LOCALQ_BATCH_SWEEP_INTERVAL": "1",
               **only_models(tmp_path / "models", CHAT)}
        service = Service(env=env, log_dir=tmp_path / "logs")
        try:
            service.start_worker("cpu", "cpu")
            service.start_api()
            yield cluster, service
        finally:
            service.stop()


def batch_input() -> bytes:
    return "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "gpt-4o-mini", "max_tokens": 8, "temperature": 0, "seed": i,
                                          "messages": [{"role": "user", "content": f"Say the number {i}."}]}})
                     for i in range(LINES)).encode()


def where_things_are(cluster: SentinelCluster, batch_id: str) -> dict:
    """What a batch that did not finish left in Redis: its record, its lines without an outcome,
    messages queued and unacknowledged, the workers' running jobs."""
    client = cluster.client()
    lines = client.hgetall(lines_key(batch_id))
    done = client.hkeys(results_key(batch_id))
    queued = {key: client.llen(key) for key in client.scan_iter(match="cpu*") if client.type(key) == "list"}
    return {"batch": client.hgetall(batch_key(batch_id)),
            "without_outcome": sorted(set(lines) - set(done))[:20],
            "queued": queued, "unacked": client.hlen("unacked"),
            "workers": [json.loads(client.get(key) or "{}").get("running_jobs")
                        for key in client.scan_iter(match="localq:worker:*") if client.type(key) == "string"]}


class Stream(threading.Thread):
    """One streamed chat, read as raw SSE: its text, how many chunks, and how it ended."""

    def __init__(self, base_url: str):
        super().__init__(daemon=True)
        self.base_url = base_url
        self.text = ""
        self.chunks = 0
        self.ending = "open"  # then "done", "error: ..." or "cut: ..."

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.base_url + "/v1/chat/completions", json={**STREAM_BODY, "stream": True},
                              timeout=httpx.Timeout(120, connect=10)) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.ending = "done"
                        return
                    data = json.loads(line[6:])
                    if "error" in data:
                        self.ending = f"error: {data['error']}"
                        return
                    self.chunks += 1
                    self.text += data["choices"][0]["delta"].get("content") or "" if data["choices"] else ""
            self.ending = "cut: the response ended without [DONE] or an error"
        except httpx.HTTPError as exc:
            self.ending = f"cut: {exc!r}"


class Prober(threading.Thread):
    """GET a batch every 50 ms: (monotonic time, status code or the connection error's name)."""

    def __init__(self, base_url: str, batch_id: str):
        super().__init__(daemon=True)
        self.url = f"{base_url}/v1/batches/{batch_id}"
        self.answers: list[tuple[float, int | str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop.is_set():
                try:
                    code: int | str = http.get(self.url).status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                self.answers.append((time.monotonic(), code))
                time.sleep(0.05)


@pytest.mark.parametrize("lost_s", [0.0, 1.0], ids=["replicated", "a-second-of-writes-lost"])
def test_a_failover_mid_batch_and_mid_stream_loses_nothing(stack, lost_s):
    cluster, service = stack
    base = service.base_url
    http = httpx.Client(base_url=base, timeout=120)
    http.post("/v1/chat/completions", json={**STREAM_BODY, "max_tokens": 1}).raise_for_status()  # model loaded
    upload = http.post("/v1/files", files={"file": ("lines.jsonl", batch_input())}, data={"purpose": "batch"})
    batch_id = http.post("/v1/batches", json={"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h"}).json()["id"]
    prober = Prober(base, batch_id)
    prober.start()
    stream = Stream(base)
    stream.start()

    def done_lines() -> int:
        counts = http.get(f"/v1/batches/{batch_id}").json()["request_counts"]
        return counts["completed"] + counts["failed"]

    wait_until(lambda: done_lines() >= LINES // 5 and stream.chunks >= 10, 120, "the batch and the stream to be under way")

    def outcomes(client) -> int:
        return client.hlen(results_key(batch_id))

    old_port = cluster.kill_primary_losing_writes(lost_s, outcomes) if lost_s else cluster.kill_primary()
    killed_at = cluster.killed_at  # the primary answered until it was killed
    promoted_at = cluster.wait_failover(old_port)

    def finished():
        try:
            found = http.get(f"/v1/batches/{batch_id}")
        except httpx.HTTPError:
            return None
        return found.status_code == 200 and found.json()["status"] in FINAL and found.json()

    try:
        final = wait_until(finished, 180, "the batch to finish after the failover", interval=0.25)
    except TimeoutError:
        raise AssertionError(f"the batch did not finish: {where_things_are(cluster, batch_id)}") from None
    stream.join(120)
    prober.stop.set()
    prober.join(15)
    if lost_s:
        at_cut, at_kill = cluster.probed
        assert at_kill > at_cut, "no line's outcome was among the writes lost: the test showed nothing"
        print(f"\n{cluster.lost_bytes} bytes of acknowledged writes lost, among them {at_kill - at_cut} "
              "line outcomes")
    print(f"\nfailover took {promoted_at - killed_at:.2f} s; stream ended: {stream.ending} after {stream.chunks} chunks")

    # the API: 200, or 503 inside the failover window only, and it answers again after it
    strays = [(round(at - killed_at, 2), code) for at, code in prober.answers
              if code != 200 and not (code == 503 and killed_at <= at <= promoted_at + RECONNECT_GRACE)]
    assert not strays, f"answers outside 200 / a 503 in the failover window: {strays[:20]}"
    assert any(code == 200 and at > promoted_at + RECONNECT_GRACE for at, code in prober.answers)
    unavailable = [at for at, code in prober.answers if code == 503]
    if unavailable:
        print(f"503 from {min(unavailable) - killed_at:.2f} s to {max(unavailable) - killed_at:.2f} s after the kill")

    # the batch: every line exactly once
    assert final["status"] == "completed", final
    assert final["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}, final["request_counts"]
    output = [json.loads(line) for line in http.get(f"/v1/files/{final['output_file_id']}/content").text.splitlines()
              if line]
    assert sorted(o["custom_id"] for o in output) == sorted(f"line-{i}" for i in range(LINES))
    assert all(o["response"]["status_code"] == 200 for o in output)

    # the stream: complete and identical to the same request asked again, or an error it was told
    assert stream.ending == "done" or stream.ending.startswith("error: "), stream.ending
    if stream.ending == "done":
        again = http.post("/v1/chat/completions", json=STREAM_BODY).json()["choices"][0]["message"]["content"]
        assert stream.text == again

    # every message was acknowledged through the new primary: none waits for the visibility timeout
    store = cluster.client()
    wait_until(lambda: not store.hlen("unacked"), 15, "every message to be acknowledged")

    # nothing was restarted: the same worker and API processes ran throughout
    assert all(process.poll() is None for process in service.workers.values())
    assert service.api.poll() is None


def test_a_command_in_flight_when_the_primary_dies_is_answered_by_the_new_one(tmp_path):
    """A worker's client (it rides over outages with retries) in the middle of a command: its
    retries must ask the sentinels again, not knock at the dead primary until they run out."""
    with SentinelCluster(tmp_path / "sentinel") as cluster:
        client = connect(QueueSettings(redis_url=cluster.url), ride_over=True).redis
        client.set("k", "kept")
        answers: dict = {}

        def blocked_read():
            try:
                answers["pop"] = client.blpop("nothing", timeout=1.5)  # waiting when the primary dies
                answers["get"] = client.get("k")
            except redis.RedisError as exc:
                answers["error"] = repr(exc)

        reader = threading.Thread(target=blocked_read)
        reader.start()
        time.sleep(0.3)
        cluster.wait_failover(cluster.kill_primary())
        reader.join(60)
        assert answers == {"pop": None, "get": "kept"}
