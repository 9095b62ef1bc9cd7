"""Fair admission of batch chunks (store/admission.py) against a real Redis."""

from __future__ import annotations

from store.admission import Admission, Chunk


def chunks(batch_id: str, project: str, count: int, cost: float = 1.0, queue: str = "cpu") -> list[Chunk]:
    return [Chunk(token=f"{batch_id}:{i}", batch_id=batch_id, project=project, queue=queue, cost=cost,
                  items=[[i, f"c{i}", {"model": "m"}]]) for i in range(count)]


def tokens(admitted: list[Chunk]) -> list[str]:
    return [chunk.token for chunk in admitted]


def finish_all(fair: Admission, admitted: list[Chunk]) -> None:
    for chunk in admitted:
        assert fair.finish(chunk.token, chunk.queue, chunk.project, 0.0)


def test_a_newcomer_is_served_ahead_for_at_most_the_lag(redis_db):
    fair = Admission(redis_db, lag=3.0)
    fair.enqueue(chunks("batch_a", "A", 20))
    first = fair.admit("cpu", 2, now=100)
    assert tokens(first) == ["batch_a:0", "batch_a:1"] and fair.admit("cpu", 2, now=100) == [], "room for 2"
    finish_all(fair, first)
    finish_all(fair, fair.admit("cpu", 2, now=100))  # A has been served 4 seconds
    fair.enqueue(chunks("batch_b", "B", 10))  # B starts 3 s (the lag) ahead of A: 1 s of virtual time
    order = []
    for _ in range(8):
        admitted = fair.admit("cpu", 1, now=100)
        order += [chunk.project for chunk in admitted]
        finish_all(fair, admitted)
    # B (at 1) goes first until it reaches A (at 4), then they take turns
    assert order == ["B", "B", "B", "A", "B", "A", "B", "A"]


def test_without_lag_projects_take_turns(redis_db):
    fair = Admission(redis_db, lag=0.0)
    fair.enqueue(chunks("batch_a", "A", 5))
    finish_all(fair, fair.admit("cpu", 1, now=1))
    fair.enqueue(chunks("batch_b", "B", 5))
    order = []
    for _ in range(6):
        admitted = fair.admit("cpu", 1, now=1)
        order += [chunk.project for chunk in admitted]
        finish_all(fair, admitted)
    assert order in (["A", "B", "A", "B", "A", "B"], ["B", "A", "B", "A", "B", "A"])


def test_a_projects_batches_go_in_order_and_what_a_chunk_really_cost_counts(redis_db):
    fair = Admission(redis_db, lag=0.0)
    fair.enqueue(chunks("batch_a1", "A", 2))
    fair.enqueue(chunks("batch_a2", "A", 1))
    fair.enqueue(chunks("batch_b", "B", 3))
    assert fair.waiting_chunks("batch_a1", ["cpu", "gpu"]) == 2
    admitted = fair.admit("cpu", 1, now=1)
    assert tokens(admitted) == ["batch_a1:0"]
    assert fair.finish("batch_a1:0", "cpu", "A", 9.0), "it took 10 s, not 1"
    assert not fair.finish("batch_a1:0", "cpu", "A", 9.0), "a redelivered chunk is charged once"
    assert fair.virtual_time("cpu", "A") == 10.0
    rest = []
    for _ in range(5):
        admitted = fair.admit("cpu", 1, now=1)
        rest += tokens(admitted)
        finish_all(fair, admitted)
    assert rest == ["batch_b:0", "batch_b:1", "batch_b:2", "batch_a1:1", "batch_a2:0"]
    assert fair.admit("cpu", 1, now=1) == [] and fair.waiting_queues(["cpu", "gpu"]) == []


def test_a_lost_chunk_gives_its_room_back_once_stale(redis_db):
    fair = Admission(redis_db, lag=0.0, stale=60)
    fair.enqueue(chunks("batch_a", "A", 3))
    assert len(fair.admit("cpu", 1, now=0)) == 1
    assert fair.admit("cpu", 1, now=59) == []
    assert tokens(fair.admit("cpu", 1, now=61)) == ["batch_a:1"], "the first one's message was lost"
    assert fair.in_flight("cpu") == 1


def test_queues_are_admitted_separately(redis_db):
    fair = Admission(redis_db)
    fair.enqueue(chunks("batch_a", "A", 2, queue="gpu") + chunks("batch_a", "A", 2, queue="cpu"))
    assert sorted(fair.waiting_queues(["cpu", "gpu"])) == ["cpu", "gpu"]
    assert len(fair.admit("gpu", 5, now=0)) == 2 and len(fair.admit("cpu", 5, now=0)) == 2
    assert fair.waiting_chunks("batch_a", ["cpu", "gpu"]) == 0


def test_a_batch_that_ends_early_leaves_nothing_waiting(redis_db):
    fair = Admission(redis_db)
    fair.enqueue(chunks("batch_a", "A", 3, queue="gpu") + chunks("batch_a", "A", 2, queue="cpu"))
    fair.enqueue(chunks("batch_a2", "A", 1, queue="cpu"))
    assert len(fair.admit("gpu", 1, now=0)) == 1
    assert fair.discard("batch_a", "A") == 4
    assert fair.waiting_queues(["cpu", "gpu"]) == ["cpu"] and tokens(fair.admit("cpu", 5, now=0)) == ["batch_a2:0"]
    assert fair.waiting_queues(["cpu", "gpu"]) == [] and redis_db.keys("localq:admission:queues:*") == ["localq:admission:queues:batch_a2"]


def test_a_returning_project_neither_banks_credit_nor_carries_debt(redis_db):
    fair = Admission(redis_db, lag=2.0)
    fair.enqueue(chunks("batch_b1", "B", 6))
    for _ in range(6):
        finish_all(fair, fair.admit("cpu", 1, now=1))  # B alone, served 6 s
    fair.enqueue(chunks("batch_a", "A", 10))
    finish_all(fair, fair.admit("cpu", 1, now=1))  # A alone, served 1 s
    fair.enqueue(chunks("batch_b2", "B", 4))  # B comes back: 2 s ahead of A, its past 6 s forgotten
    order = []
    for _ in range(6):
        admitted = fair.admit("cpu", 1, now=1)
        order += [chunk.project for chunk in admitted]
        finish_all(fair, admitted)
    assert order == ["B", "B", "A", "B", "A", "B"]
