"""Worker liveness and clean shutdown against a real Redis (127.0.0.1:6379, or REDIS_URL).

- `touch` (the heartbeat) keeps a batch claimed past idle_ms; without it the batch is reclaimed.
- `Heartbeat` fails a batch that exceeds its time limit (retried, then dead-lettered) and calls
  `on_hung` if the work never returns.
- `release` / `release_all` give held batches back at once, without counting a try.

Waits are polls with generous deadlines; a "not reclaimed" is asserted only right after a touch,
when the idle time Redis reports is known to be far below idle_ms.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

redis = pytest.importorskip("redis")

from patchaudit.queue.messages import BatchMessage  # noqa: E402
from patchaudit.queue.streams import GROUP, BatchQueue, QueueOptions  # noqa: E402
from patchaudit.workers.heartbeat import Heartbeat  # noqa: E402

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
IDLE_MS = 1_000
DEADLINE_S = 30.0


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(URL, socket_timeout=10)
    try:
        c.ping()
    except (redis.ConnectionError, redis.TimeoutError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no Redis answers at {URL}: {e}")
        pytest.skip(f"no Redis at {URL}: {e}")
    yield c
    c.close()


@pytest.fixture
def make_queue(client: redis.Redis) -> Iterator:
    made: list[BatchQueue] = []

    def make(**options) -> BatchQueue:
        opts = {"idle_ms": IDLE_MS, "max_attempts": 3, "block_ms": 0, "backoff_s": 0.0, **options}
        q = BatchQueue(client, "t" + uuid.uuid4().hex[:16], QueueOptions(**opts))
        q.enqueue([BatchMessage(q.run_id, f"b{i:06d}", (f"img/{i}.png",)) for i in range(2)])
        made.append(q)
        return q

    yield make
    for q in made:
        q.delete()


def idle_ms(client: redis.Redis, q: BatchQueue, entry_id: str) -> int:
    [row] = client.xpending_range(q.keys.stream, GROUP, entry_id, entry_id, 1)
    return int(row["time_since_delivered"])


def poll(check, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_a_touched_batch_is_not_reclaimed_and_an_untouched_one_is(client, make_queue) -> None:
    q = make_queue()
    [d] = q.claim("alive", count=1)
    for _ in range(3):  # three idle timeouts in all: without the touches the batch would be reclaimed
        poll(lambda: idle_ms(client, q, d.entry_id) > IDLE_MS, "the entry to go idle")
        assert q.touch([d]) == 1
        assert idle_ms(client, q, d.entry_id) < IDLE_MS
        got = q.claim("other", count=2)  # takes the other, never-claimed batch at most
        assert d.batch_id not in {g.batch_id for g in got}
        for g in got:
            q.ack(g, "other")
    # Stop touching: the batch is reclaimed by another consumer once idle_ms has passed.
    [r] = poll(lambda: q.claim("other", count=1), "the untouched batch to be reclaimed")
    assert r.batch_id == d.batch_id and r.attempt == 1
    assert q.touch([d]) == 0  # the old holder cannot take it back
    assert q.ack(r, "other") is True


def test_heartbeat_keeps_a_slow_batch_claimed(client, make_queue) -> None:
    """A batch that takes 4 idle timeouts is never reclaimed while its worker beats; it is acked once."""
    q = make_queue()
    [d] = q.claim("slow", count=1)
    reclaimed = []
    with Heartbeat(q, d, interval_s=IDLE_MS / 5000, timeout_s=600):
        deadline = time.monotonic() + 4 * IDLE_MS / 1000
        while time.monotonic() < deadline:  # another worker keeps asking for stuck work
            reclaimed += [g for g in q.claim("thief", count=2) if g.batch_id == d.batch_id]
            time.sleep(0.05)
    assert reclaimed == []
    assert q.ack(d, "slow") is True
    assert int(client.hget(q.keys.attempts, d.batch_id)) == 0


def test_a_batch_over_its_time_limit_is_failed_retried_then_dead_lettered(client, make_queue) -> None:
    q = make_queue(max_attempts=2)
    hung = threading.Event()
    [d] = [x for x in q.claim("w1", count=2) if x.batch_id == "b000000"] or pytest.fail("no delivery")
    with Heartbeat(q, d, interval_s=0.05, timeout_s=0.2, grace_s=0.3, on_hung=hung.set) as beat:
        poll(hung.is_set, "the hung worker to be given up on")  # the work "never returns"
    assert beat.timed_out
    # Failed once: retried (attempt 1) by the next claim, not held by the hung worker any more.
    retry = poll(lambda: [x for x in q.claim("w2", count=2) if x.batch_id == "b000000"], "the retry")[0]
    assert retry.attempt == 1
    with Heartbeat(q, retry, interval_s=0.05, timeout_s=0.2, grace_s=60, on_hung=pytest.fail) as beat:
        poll(lambda: beat.timed_out, "the second time limit")
    [letter] = q.dead_letters()
    assert letter.batch_id == "b000000" and "batch_timeout_s" in letter.reason


def test_release_gives_batches_back_at_once_without_a_try(client, make_queue) -> None:
    q = make_queue(idle_ms=3_600_000)  # nothing could be reclaimed during the test
    held = q.claim("gone", count=2)
    assert len(held) == 2 and q.claim("new", count=2) == []
    assert q.release_all(keep=["new"]) == 2
    assert "gone" not in [c["name"] for c in q.consumers()]
    got = q.claim("new", count=2)
    assert sorted(g.batch_id for g in got) == ["b000000", "b000001"]
    assert all(g.attempt == 0 and g.delivery_count == 1 for g in got)
    assert all(q.ack(g, "new") for g in got) and q.is_finished()
    assert q.release("new") == 0  # holds nothing
