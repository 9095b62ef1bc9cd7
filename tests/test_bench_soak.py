"""`ops.bench.soak.summary`: the figures the capacity soak reports from its samples."""

from __future__ import annotations

from ops.bench.soak import summary


def rows(memory, aof):
    return [{"t_s": 10.0 * (i + 1), "jobs_done": 100 * (i + 1), "jobs_failed": 0, "used_memory": m, "keys": m // 1000,
             "aof_bytes": a} for i, (m, a) in enumerate(zip(memory, aof, strict=True))]


def test_a_level_memory_and_a_saw_tooth_aof():
    memory = [1_000_000 * min(i + 1, 4) for i in range(8)]  # grows for 40 s, then holds
    aof = [10, 20, 30, 5, 15, 25, 6, 16]
    figures = summary(rows(memory, aof), retention=30.0, empty=1_000_000)
    assert figures["jobs_per_s"] == 10.0 and figures["duration_s"] == 80.0
    assert figures["used_memory_third_quarter"] == figures["used_memory_last_quarter"] == 4_000_000
    assert figures["aof_rewrites"] == 2 and figures["aof_max_bytes"] == 30
    assert figures["bytes_per_job_held"] == 10_000  # 3 MB over 10 jobs/s x 30 s
