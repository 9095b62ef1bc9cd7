"""The end-to-end benchmarks' own logic (ops/bench/concurrency.py, ops/bench/llm.py): how they count
tokens and judge the targets. No timing is asserted; the figures themselves come from running them."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ops.bench.concurrency import HttpStreams, Sample, concurrent_figures, find_peer_python, report
from ops.bench.llm import OverHttp

# Six tokens in two events, as a server that coalesces token events sends them, then the usage.
COALESCED = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Once upon"}}]},
    {"choices": [{"index": 0, "delta": {"content": " a time there"}}]},
    {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}},
]


@pytest.fixture
def sse_server():
    """A stub OpenAI-compatible server streaming COALESCED (or 429 for model "full")."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["model"] == "full":
                payload = b'{"error": {"message": "full", "type": "x", "param": null, "code": null}}'
                self.send_response(429)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for chunk in COALESCED:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_tokens_are_counted_from_usage_not_from_events(sse_server):
    streams = HttpStreams(sse_server, "m", {}, 6, streams=2)
    try:
        sample = streams.stream()
        assert (sample.tokens, sample.status) == (6, 200)
        assert sample.first is not None and sample.sent <= sample.first <= sample.end
        assert streams.body["stream_options"] == {"include_usage": True}
    finally:
        streams.close()
    assert OverHttp(sse_server, "m", {}, 6).generate()[2] == 6


def test_a_refused_stream_is_counted_as_refused(sse_server):
    streams = HttpStreams(sse_server, "full", {}, 6, streams=2)
    try:
        figures = concurrent_figures(streams.concurrent(2), tokens=6)
    finally:
        streams.close()
    assert (figures["served"], figures["refused"], figures["streams"]) == (0, 2, 2)


def test_a_python_without_xllamacpp_is_no_peer():
    assert find_peer_python(sys.executable) is None


def _round(localq_4: float, peer_4: float, localq_16: float, ttft_4: float, served_16: int = 16) -> dict:
    def streams(rate, ttft, served, count):
        return {"aggregate_tokens_per_s": rate, "worst_ttft_s": ttft, "served": served,
                "refused": count - served, "streams": count}

    def single(ttft, rate):  # 11 tokens: 10 after the first, at `rate`
        return {"sent": 0.0, "first": ttft, "end": ttft + 10 / rate, "tokens": 11, "status": 200}

    return {
        "streams": {"localq": streams(localq_4, ttft_4, 4, 4), "llama-server": streams(peer_4, 0.1, 4, 4)},
        "wide": {"localq": streams(localq_16, 3.0, served_16, 16), "llama-server": streams(peer_4, 3.0, 16, 16)},
        "single": {"in-process": [single(0.020, 100.0)] * 3, "localq": [single(0.028, 97.0)] * 3,
                   "llama-server": [single(0.025, 95.0)] * 3},
        "batch": {"one at a time": {"lines_per_s": 1.0, "seconds": 200.0, "completed": 200},
                  "batched": {"lines_per_s": 3.0, "seconds": 66.7, "completed": 200}},
        "cold": {"first_ttft_s": 0.05, "warm_ttft_s": 0.03, "ready_s": 4.0},
    }


ARGS = argparse.Namespace(streams=4, wide_streams=16, tokens=11, parallel=4, warm=5, batch_lines=200, batch_tokens=32,
                          before="768a339")


def _verdicts(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.startswith("  ")]


def test_report_passes_figures_that_meet_every_target():
    text, figures = report(ARGS, {"rounds": [_round(120, 110, 125, 0.2)] * 3})
    assert _verdicts(text) == ["PASS"] * 8
    assert figures["single"]["added_ttft_ms"] == pytest.approx(8.0)
    assert figures["batch"]["speedup"] == pytest.approx(3.0)


def test_report_fails_each_missed_target():
    rounds = [_round(100, 110, 90, 0.2), _round(100, 110, 90, 0.7, served_16=15), _round(100, 110, 90, 0.2)]
    text, figures = report(ARGS, {"rounds": rounds})
    # 4 streams: slower than the peer, one first token late; 16: one not served, less than 4 streams
    assert _verdicts(text)[:4] == ["FAIL", "FAIL", "FAIL", "FAIL"]
    assert figures["streams"]["worst_ttft_s"] == 0.7  # the worst of all rounds, not the median


def test_the_batch_target_compares_with_the_worker_from_before_batching_when_it_ran():
    found = _round(120, 110, 125, 0.2)
    found["batch"]["before batching"] = {"lines_per_s": 1.5, "seconds": 133.3, "completed": 200}
    text, figures = report(ARGS, {"rounds": [found]})
    assert figures["batch"]["speedup"] == pytest.approx(2.0)  # 3.0 / 1.5, not 3.0 / 1.0
    assert figures["batch"]["speedups"]["one at a time"] == pytest.approx(3.0)
    assert "FAIL  lines/s >= 2.5x today's one at a time (before batching): 2.000x" in text
    assert "n/a   (for reference) batched vs one at a time: 3.000x" in text


def test_report_without_the_peer_says_so():
    found = _round(120, 110, 125, 0.2)
    for part in ("streams", "wide", "single"):
        del found[part]["llama-server"]
    text, figures = report(ARGS, {"rounds": [found]})
    assert "n/a" in _verdicts(text) and "llama-server was skipped" in text
    assert figures["streams"]["localq_vs_peer"] is None
    assert Sample(**found["single"]["localq"][0]).decode_rate == pytest.approx(97.0)
