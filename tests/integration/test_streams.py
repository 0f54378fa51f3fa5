"""The batch queue against a real Redis (127.0.0.1:6379, or REDIS_URL).

Skipped when no Redis answers, unless CI=true (then a missing Redis fails the run).
Every test uses its own run id and deletes the run's keys afterwards.

No test depends on how fast the machine is: work that must not be reclaimed is given a minute of
idle time; reclaims and retries are awaited by polling with a generous deadline; a "not yet" is asserted
only when the client measured less time than the idle/backoff (a loaded machine may take longer
between two calls, and then the early claim is right to return the work).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator

import pytest

redis = pytest.importorskip("redis")

from patchaudit.queue.messages import BatchMessage, DeadLetter  # noqa: E402
from patchaudit.queue.streams import (  # noqa: E402
    GROUP,
    BatchQueue,
    FailOutcome,
    Progress,
    QueueError,
    QueueOptions,
)

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
FAST = QueueOptions(idle_ms=60_000, max_attempts=3, block_ms=50, backoff_s=0.0)  # no reclaims
RECLAIM_IDLE_MS = 1_000  # tests of reclaiming: short enough to wait for, long enough to see "not yet"
DEADLINE_S = 30.0  # for whatever the tests wait on; a healthy run waits about RECLAIM_IDLE_MS


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(URL, decode_responses=request.param, socket_timeout=10)
    try:
        c.ping()
    except (redis.ConnectionError, redis.TimeoutError) as e:
        c.close()
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no Redis answers at {URL}: {e}")
        pytest.skip(f"no Redis answers at {URL} ({e}); start redis-server or set REDIS_URL")
    yield c
    c.close()


@pytest.fixture
def make_queue(client: redis.Redis) -> Iterator:
    made: list[BatchQueue] = []

    def make(options: QueueOptions = FAST, run_id: str | None = None) -> BatchQueue:
        q = BatchQueue(client, run_id or "t" + uuid.uuid4().hex[:16], options)
        made.append(q)
        return q

    yield make
    for q in made:
        q.delete()


def plan(q: BatchQueue, n: int) -> list[BatchMessage]:
    return [BatchMessage(q.run_id, f"b{i:06d}", (f"img/{i}a.png", f"img/{i}b.png")) for i in range(n)]


def in_flight(client: redis.Redis, q: BatchQueue) -> int:
    return int(client.xpending(q.keys.stream, GROUP)["pending"])


def claim_when_due(q: BatchQueue, consumer: str, until=None) -> list:
    """claim() (block_ms=0) every 50 ms until it hands something out, or until `until()` is true; fails
    after DEADLINE_S. Returns the last claim's deliveries."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        got = q.claim(consumer, block_ms=0)
        if until() if until else got:
            return got
        assert time.monotonic() < deadline, f"nothing for {consumer} after {DEADLINE_S:.0f}s"
        time.sleep(0.05)


pytestmark = pytest.mark.integration


def test_enqueue_claim_ack_happy_path(client: redis.Redis, make_queue) -> None:
    q = make_queue()
    assert not q.is_finished()  # nothing enqueued yet
    assert q.enqueue(plan(q, 3)) == 3
    assert q.progress() == Progress(total=3, done_ok=0, dead=0, pending=3, in_flight=0)

    first = q.claim("w1", count=2)
    assert [d.batch_id for d in first] == ["b000000", "b000001"]
    assert all(d.attempt == 0 and d.delivery_count == 1 and d.consumer == "w1" for d in first)
    assert first[0].message.keys == ("img/0a.png", "img/0b.png")
    assert q.progress() == Progress(total=3, done_ok=0, dead=0, pending=1, in_flight=2)

    second = q.claim("w2", count=5)
    assert [d.batch_id for d in second] == ["b000002"]
    for d in first + second:
        assert q.ack(d, d.consumer) is True
    assert q.claim("w1", block_ms=0) == []
    assert q.progress() == Progress(total=3, done_ok=3, dead=0, pending=0, in_flight=0)
    assert q.is_finished()
    record = json.loads(client.hget(q.keys.done, "b000002"))
    assert record["status"] == "ok" and record["worker"] == "w2" and record["ts"] > 0
    assert client.xlen(q.keys.stream) == 0  # finished entries are deleted, not just acked


def test_ack_is_idempotent(client: redis.Redis, make_queue) -> None:
    q = make_queue()
    q.enqueue(plan(q, 1))
    (d,) = q.claim("w1")
    assert q.ack(d, "w1") is True
    assert q.ack(d, "w1") is False
    assert q.ack(d, "w2") is False
    assert q.progress() == Progress(total=1, done_ok=1, dead=0, pending=0, in_flight=0)
    assert json.loads(client.hget(q.keys.done, d.batch_id))["worker"] == "w1"  # first ack wins


def test_ack_many_acks_in_one_round_trip_and_stays_idempotent(client: redis.Redis, make_queue) -> None:
    q = make_queue()
    q.enqueue(plan(q, 3))
    held = q.claim("w1", count=3)
    assert len(held) == 3 and q.ack_many([], "w1") == []
    assert q.ack_many(held[:2], "w1") == [True, True]
    assert q.ack_many(held, "w1") == [False, False, True]
    assert q.progress() == Progress(total=3, done_ok=3, dead=0, pending=0, in_flight=0)
    assert q.is_finished()


def test_dead_consumer_work_is_reclaimed_with_attempt_incremented(client: redis.Redis, make_queue) -> None:
    q = make_queue(QueueOptions(idle_ms=RECLAIM_IDLE_MS, max_attempts=3, block_ms=50, backoff_s=0.0))
    q.enqueue(plan(q, 1))
    t0 = time.monotonic()
    (held,) = q.claim("dies")  # claims, then "dies" without acking
    early = q.claim("alive", block_ms=0)
    assert not early or time.monotonic() - t0 >= RECLAIM_IDLE_MS / 1e3, "reclaimed before idle_ms"
    (again,) = early or claim_when_due(q, "alive")
    assert time.monotonic() - t0 >= RECLAIM_IDLE_MS / 1e3  # never before the entry was idle that long
    assert again.batch_id == held.batch_id and again.entry_id == held.entry_id
    assert (again.attempt, again.delivery_count, again.consumer) == (1, 2, "alive")
    assert client.hget(q.keys.attempts, held.batch_id) in (b"1", "1")
    assert q.progress().in_flight == 1

    # The presumed-dead consumer wakes up: its fail() must not count a second try ...
    assert q.fail(held, "late failure") is FailOutcome.STALE
    assert client.hget(q.keys.attempts, held.batch_id) in (b"1", "1")
    assert client.zcard(q.keys.retry) == 0
    # ... but if it finishes, the result stands and the new holder's ack is a no-op.
    assert q.ack(held, "dies") is True
    assert q.ack(again, "alive") is False
    assert q.progress() == Progress(total=1, done_ok=1, dead=0, pending=0, in_flight=0)


def test_batch_abandoned_max_attempts_times_is_dead_lettered(client: redis.Redis, make_queue) -> None:
    q = make_queue(QueueOptions(idle_ms=RECLAIM_IDLE_MS, max_attempts=2, block_ms=0, backoff_s=0.0))
    q.enqueue(plan(q, 1))
    assert len(q.claim("w1")) == 1
    (d,) = claim_when_due(q, "w2")  # reclaim: attempt 1
    assert d.attempt == 1
    # reclaim: attempt 2 == max_attempts -> dead, never delivered (every claim meanwhile returns nothing)
    assert claim_when_due(q, "w3", until=q.dead_letters) == []
    (letter,) = q.dead_letters()
    assert letter.batch_id == d.batch_id and letter.attempts == 2
    assert "abandoned 2 times" in letter.reason and letter.keys == d.message.keys
    assert q.progress() == Progress(total=1, done_ok=0, dead=1, pending=0, in_flight=0)
    assert q.is_finished()


def test_fail_retries_then_dead_letters_with_reason(client: redis.Redis, make_queue) -> None:
    q = make_queue()
    q.enqueue(plan(q, 2))
    d, other = q.claim("w1", count=2)
    outcomes, attempts = [], []
    for _ in range(3):
        attempts.append(d.attempt)
        outcomes.append(q.fail(d, f"decode error on try {d.attempt}"))
        # a retry waits in the retry set (until a claim moves it); a dead batch leaves nothing behind
        assert client.zcard(q.keys.retry) == (outcomes[-1] is FailOutcome.RETRY)
        assert in_flight(client, q) == 1  # the failed entry was acked; only `other` is held
        got = q.claim("w1", block_ms=0)  # backoff 0: the retry is back at once
        if outcomes[-1] is FailOutcome.RETRY:
            (d,) = got
            assert d.batch_id == "b000000" and d.delivery_count == 1  # a fresh entry
        else:
            assert got == []  # a dead batch is not delivered again
    assert attempts == [0, 1, 2]
    assert outcomes == [FailOutcome.RETRY, FailOutcome.RETRY, FailOutcome.DEAD]
    assert q.dead_letters() == [
        DeadLetter(q.run_id, "b000000", ("img/0a.png", "img/0b.png"), 3, "decode error on try 2")
    ]
    assert json.loads(client.hget(q.keys.done, "b000000"))["status"] == "dead"
    assert q.progress() == Progress(total=2, done_ok=0, dead=1, pending=0, in_flight=1)
    assert not q.is_finished()  # b000001 is still held
    assert q.fail(d, "again") is FailOutcome.STALE  # the dead entry is no longer held
    assert q.ack(other, "w1") is True
    assert q.is_finished()
    assert q.progress() == Progress(total=2, done_ok=1, dead=1, pending=0, in_flight=0)


def test_retry_waits_out_the_backoff(client: redis.Redis, make_queue, monkeypatch) -> None:
    backoff_s, block_ms = 1.0, 9_000  # block_ms below the client's socket_timeout (10 s)
    q = make_queue(QueueOptions(idle_ms=60_000, max_attempts=3, block_ms=block_ms, backoff_s=backoff_s))
    q.enqueue(plan(q, 1))
    (d,) = q.claim("w1")
    t0 = time.monotonic()
    assert q.fail(d, "transient") is FailOutcome.RETRY
    early = q.claim("w1", block_ms=0)
    assert not early or time.monotonic() - t0 >= backoff_s, "a retry was handed out before its backoff"
    if not early:
        assert q.progress() == Progress(total=1, done_ok=0, dead=0, pending=1, in_flight=0)
    blocks: list[int | None] = []  # how long each claim asked Redis to wait for new work
    read_new = q._read_new
    monkeypatch.setattr(q, "_read_new", lambda *a: blocks.append(a[-1]) or read_new(*a))
    got, deadline = early, time.monotonic() + DEADLINE_S
    while not got:  # claims with the default block_ms, as a worker's loop does
        assert time.monotonic() < deadline, f"the retry was not handed out within {DEADLINE_S:.0f}s"
        got = q.claim("w1")
    assert [x.attempt for x in got] == [1]
    assert got[0].message.keys == d.message.keys
    assert time.monotonic() - t0 >= backoff_s  # never before the backoff
    # The claim that waited for new work while the retry was pending woke up when the retry was due,
    # not after the full block_ms (the claim handing the retry out may ask for the full block: the
    # entry is already in the stream then, so Redis answers at once).
    assert early or blocks[0] is None or blocks[0] <= backoff_s * 1e3, blocks


def test_malformed_entries_are_dead_lettered_and_loop_continues(client: redis.Redis, make_queue) -> None:
    q = make_queue()
    q.ensure_group()
    client.xadd(q.keys.stream, {"msg": b"\x00not json"})
    client.xadd(q.keys.stream, {"payload": "{}"})
    client.xadd(q.keys.stream, {"msg": BatchMessage("otherrun", "b9", ("k",)).encode()})
    q.enqueue(plan(q, 1))
    got = q.claim("w1", count=10)
    assert [d.batch_id for d in got] == ["b000000"]
    letters = q.dead_letters()
    assert len(letters) == 3
    assert all(x.batch_id.startswith("entry-") and x.keys == () for x in letters)
    assert "not valid UTF-8 JSON" in letters[0].reason
    assert "expected exactly ['msg']" in letters[1].reason
    assert "for run 'otherrun'" in letters[2].reason
    assert in_flight(client, q) == 1  # only the good entry is pending; garbage was acked
    assert client.xlen(q.keys.stream) == 1
    q.ack(got[0], "w1")
    # malformed entries are not batches of the run: they do not count in total or dead
    assert q.progress() == Progress(total=1, done_ok=1, dead=0, pending=0, in_flight=0)


def test_entry_of_a_finished_batch_is_skipped(client: redis.Redis, make_queue) -> None:
    q = make_queue()
    q.enqueue(plan(q, 1))
    (d,) = q.claim("w1")
    q.ack(d, "w1")
    client.xadd(q.keys.stream, {"msg": d.message.encode()})  # a stray duplicate
    assert q.claim("w2", block_ms=0) == []
    assert client.xlen(q.keys.stream) == 0 and in_flight(client, q) == 0


def test_resume_enqueues_only_missing_batches(client: redis.Redis, make_queue) -> None:
    q = make_queue()
    batches = plan(q, 5)
    assert q.enqueue(batches[:3]) == 3  # the planner died after queuing 3 of 5
    (d0,) = q.claim("w1")
    q.ack(d0, "w1")
    (d1,) = q.claim("w1")  # b000001 in flight, b000002 queued

    resumed = BatchQueue(client, q.run_id, FAST)  # a new scheduler process
    assert resumed.enqueue(batches) == 2  # b000003, b000004; not the done one, not the queued ones
    assert resumed.progress() == Progress(total=5, done_ok=1, dead=0, pending=3, in_flight=1)
    assert resumed.enqueue(batches) == 0

    # an entry lost from the stream (e.g. trimmed by hand) is queued again on resume
    client.xdel(q.keys.stream, d1.entry_id)
    client.xack(q.keys.stream, GROUP, d1.entry_id)
    assert resumed.enqueue(batches) == 1
    ids = sorted(d.batch_id for d in resumed.claim("w2", count=10))
    assert ids == ["b000001", "b000002", "b000003", "b000004"]


def test_enqueue_rejects_foreign_and_duplicate_batches(make_queue) -> None:
    q = make_queue()
    with pytest.raises(QueueError, match="belongs to run 'other'"):
        q.enqueue([BatchMessage("other", "b1", ("k",))])
    with pytest.raises(QueueError, match="appears twice"):
        q.enqueue([BatchMessage(q.run_id, "b1", ("k",)), BatchMessage(q.run_id, "b1", ("j",))])
    with pytest.raises(QueueError, match="consumer/worker name"):
        q.claim("has space")
    with pytest.raises(QueueError, match="count must be"):
        q.claim("w1", count=0)


def test_delete_removes_every_key_of_the_run(client: redis.Redis, make_queue) -> None:
    q = make_queue(QueueOptions(idle_ms=60_000, block_ms=0, backoff_s=30))
    q.enqueue(plan(q, 3))
    a, b = q.claim("w1", count=2)
    q.ack(a, "w1")
    q.fail(b, "x")  # -> retry set
    client.xadd(q.keys.stream, {"msg": "garbage"})
    q.claim("w1", count=5)  # dead-letters the garbage
    assert all(client.exists(k) for k in q.keys.all())
    assert q.delete() == 6
    assert not any(client.exists(k) for k in q.keys.all())


def test_claim_on_a_deleted_run_is_a_queue_error(client: redis.Redis, make_queue) -> None:
    q = make_queue()
    worker_side = BatchQueue(client, q.run_id, FAST)
    worker_side.ensure_group()
    q.delete()  # e.g. `patchaudit delete RUN` while a worker still polls it
    with pytest.raises(QueueError, match="has no queue"):
        worker_side.claim("w1")


def test_reconcile_requeues_batches_whose_results_are_gone(client: redis.Redis, make_queue) -> None:
    q = make_queue(QueueOptions(idle_ms=60_000, max_attempts=1, block_ms=0))
    batches = plan(q, 3)
    q.enqueue(batches)
    d0, d1, d2 = q.claim("w1", count=3)
    q.ack(d0, "w1")
    q.ack(d1, "w1")
    q.fail(d2, "boom")  # max_attempts=1: dead-lettered at once
    assert q.is_finished()
    # Only b000000's part survived: b000001 is redone; the dead letter b000002 is kept.
    ids = [b.batch_id for b in batches]
    assert q.reconcile(ids, {"b000000"}) == ["b000001"]
    assert q.progress() == Progress(total=3, done_ok=1, dead=1, pending=1, in_flight=0)
    assert not q.is_finished()
    assert q.enqueue(batches) == 1
    assert [d.batch_id for d in q.claim("w2", count=3)] == ["b000001"]
    assert q.reconcile(ids, {"b000000", "b000001"}) == []


def test_script_calls_share_one_round_trip_and_an_unloaded_script_runs_once(client: redis.Redis) -> None:
    from patchaudit.queue.pipelined import Pipelined

    # A script this Redis has never seen (a fresh comment, a fresh sha): its first EVALSHA fails with
    # NOSCRIPT inside the pipeline and must then run exactly once on its own.
    script = client.register_script(f"-- {uuid.uuid4().hex}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")
    key = f"patchaudit:test-pipelined:{uuid.uuid4().hex}"
    try:
        p = Pipelined(client)
        p.script(script, [key], [2])
        p.pipe.incrby(key, 3)
        p.script(script, [key], [4])
        first = p.execute()
        assert first[1] == 3 and sorted(first) == [3, 5, 9]  # the plain command ran once, in the pipeline
        assert int(client.get(key)) == 9
        p = Pipelined(client)  # loaded now: all three in the pipeline
        p.script(script, [key], [1])
        p.pipe.incrby(key, 1)
        p.script(script, [key], [1])
        assert p.execute() == [10, 11, 12]
        p = Pipelined(client)  # an error reply is raised, as a pipeline's execute() raises it
        p.pipe.lpush(key, "x")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            p.execute()
    finally:
        client.delete(key)
