"""ops/bench/first_token.py's arithmetic: the first token's time cut at the job's marks in Redis."""

from __future__ import annotations

import pytest

from ops.bench.first_token import hops


def test_the_first_token_is_cut_at_the_record_the_running_status_and_the_first_delta():
    record = {"created_at": "100.004000"}
    ids = ["100007-0", "100025-0", "100037-0"]
    cut = hops(100.000, 100.028, record, ids, ["status", "delta", "delta"])
    assert cut["api"] == pytest.approx(0.004)
    assert cut["queue"] == pytest.approx(0.003)
    assert cut["worker"] == pytest.approx(0.018)
    assert cut["relay"] == pytest.approx(0.003)
    assert cut["total"] == pytest.approx(sum(cut[name] for name in ("api", "queue", "worker", "relay")))


def test_a_status_after_the_first_delta_does_not_move_the_marks():
    cut = hops(10.0, 10.05, {"created_at": "10.01"}, ["10020-0", "10040-0", "10041-0"], ["status", "delta", "status"])
    assert cut["worker"] == pytest.approx(0.020)
