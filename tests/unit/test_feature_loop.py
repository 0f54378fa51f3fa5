"""The feature worker's staged loop (workers.feature_loop) against an in-memory queue: order, bounds,
the ack only after the part, failures, skips, time limits, and the local decoder's order and errors."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from patchaudit.workers.decode import Preprocess
from patchaudit.workers.feature_loop import FeatureLoop, LocalDecoder, Ready
from patchaudit.workers.heartbeat import Heartbeats
from patchaudit.workers.pipeline import Decoded


@dataclass(frozen=True)
class Msg:
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Delivery:
    entry_id: str
    batch_id: str
    message: Msg
    consumer: str = "w"
    attempt: int = 0


class FakeQueue:
    """Hands out `n` messages; records acks, fails, touches and how many were held at once."""

    def __init__(self, n: int, keys_per_message: int = 4) -> None:
        self.todo = [
            Delivery(f"e{i}", f"b{i:03d}", Msg(tuple(f"k{i}-{j}" for j in range(keys_per_message)))) for i in range(n)
        ]
        self.total = n
        self.acked: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.touched: set[str] = set()
        self.held: set[str] = set()
        self.max_held = 0
        self.claims = 0
        self.ack_calls = 0
        self.lock = threading.Lock()
        self.events: list[str] = []

    def is_finished(self) -> bool:
        with self.lock:
            return len(self.acked) + len(self.failed) >= self.total

    def claim(self, name: str, count: int = 1, block_ms: int | None = None) -> list[Delivery]:
        with self.lock:
            self.claims += 1
            out, self.todo = self.todo[:count], self.todo[count:]
            self.held |= {d.entry_id for d in out}
            self.max_held = max(self.max_held, len(self.held))
            self.events += [f"claim {d.batch_id}" for d in out]
        if not out:
            time.sleep(0.005)
        return out

    def ack(self, d: Delivery, worker: str) -> bool:
        with self.lock:
            self.acked.append(d.batch_id)
            self.held.discard(d.entry_id)
            self.events.append(f"ack {d.batch_id}")
        return True

    def ack_many(self, deliveries, worker: str) -> list[bool]:
        with self.lock:
            self.ack_calls += 1
        return [self.ack(d, worker) for d in deliveries]

    def fail(self, d: Delivery, reason: str) -> str:
        with self.lock:
            if d.entry_id in self.held:
                self.failed.append((d.batch_id, reason))
                self.held.discard(d.entry_id)
        return "dead"

    def touch(self, deliveries) -> int:
        with self.lock:
            self.touched |= {d.entry_id for d in deliveries}
        return len(list(deliveries))


def fetched_of(d: Delivery):
    from patchaudit.workers.feature_loop import Fetched

    return Fetched([Decoded(k, None, "empty file", 0.0) for k in d.message.keys])


def make_loop(q: FakeQueue, depth: int = 3, timeout_s: float = 60.0, **stages) -> FeatureLoop:
    parts: dict[str, list[str]] = {}

    def commit(d, results):
        with q.lock:
            q.events.append(f"part {d.batch_id}")
        parts[d.batch_id] = results

    def compute(d, fetched):
        with q.lock:
            q.events.append(f"compute {d.batch_id}")
        return [it.key for it in fetched.items]

    beats = Heartbeats(q, interval_s=0.01, timeout_s=timeout_s, grace_s=60, on_hung=lambda: None)
    loop = FeatureLoop(
        q,
        "w",
        prepare=stages.get("prepare", lambda d: Ready(fetched_of(d))),
        compute=stages.get("compute", compute),
        commit=stages.get("commit", commit),
        beats=beats,
        depth=depth,
    )
    loop.parts = parts  # type: ignore[attr-defined]
    return loop


def test_every_message_is_committed_then_acked_in_order_with_bounded_holding():
    q = FakeQueue(20)
    loop = make_loop(q, depth=3)
    stats = loop.run(max_idle_s=5)
    assert q.acked == [f"b{i:03d}" for i in range(20)]
    assert stats["batches"] == 20 and stats["images"] == 80 and stats["failed_batches"] == 0
    assert 1 <= q.max_held <= 3
    for b in q.acked:  # the part before the ack
        assert q.events.index(f"part {b}") < q.events.index(f"ack {b}")
    assert loop.parts["b007"] == [f"k7-{j}" for j in range(4)]


def test_the_next_message_is_claimed_while_one_is_computed():
    q = FakeQueue(6)
    gate = threading.Event()

    def compute(d, fetched):
        if d.batch_id == "b000":
            assert gate.wait(5), "the feeder did not claim ahead while b000 was on the device"
        return []

    def prepare(d):
        if d.batch_id == "b002":
            gate.set()  # b001 and b002 claimed and prepared while b000 computes
        return Ready(fetched_of(d))

    make_loop(q, depth=3, compute=compute, prepare=prepare).run(max_idle_s=5)
    assert len(q.acked) == 6


def test_claims_and_acks_are_shared_by_several_messages():
    q = FakeQueue(40)
    gate = threading.Event()

    def commit(d, results):  # the first part waits until the others are computed: their acks pile up
        if d.batch_id == "b000":
            gate.wait(5)

    def compute(d, fetched):
        if d.batch_id == "b007":
            gate.set()
        return []

    stats = make_loop(q, depth=8, compute=compute, commit=commit).run(max_idle_s=5)
    assert q.acked == [f"b{i:03d}" for i in range(40)] and q.max_held <= 8
    assert q.ack_calls < 40 and stats["acks"] == q.ack_calls
    assert stats["claims"] < 40


def test_a_part_is_written_while_an_older_one_is_still_being_made_durable_and_acks_keep_claim_order():
    q = FakeQueue(8)
    second_written = threading.Event()

    def commit(d, results):  # b000's write (its fsync, its upload) lasts until b001's part is written
        with q.lock:
            q.events.append(f"part {d.batch_id}")
        if d.batch_id == "b000":
            assert second_written.wait(5), "the next part waited for the previous one to be written"
        if d.batch_id == "b001":
            second_written.set()

    stats = make_loop(q, depth=3, commit=commit).run(max_idle_s=5)
    assert q.acked == [f"b{i:03d}" for i in range(8)] and stats["batches"] == 8
    assert q.events.index("ack b000") > q.events.index("part b001")  # written early, acked in its turn
    for b in q.acked:
        assert q.events.index(f"part {b}") < q.events.index(f"ack {b}")


def test_depth_one_holds_one_message_at_a_time():
    q = FakeQueue(5)
    make_loop(q, depth=1).run(max_idle_s=5)
    assert q.max_held == 1 and len(q.acked) == 5


def test_failures_in_each_stage_fail_only_their_message():
    q = FakeQueue(6)

    def prepare(d):
        if d.batch_id == "b001":
            raise LookupError("not listed")
        return Ready(fetched_of(d))

    def compute(d, fetched):
        if d.batch_id == "b002":
            raise RuntimeError("device")
        return []

    def commit(d, results):
        if d.batch_id == "b003":
            raise OSError("store")

    stats = make_loop(q, prepare=prepare, compute=compute, commit=commit).run(max_idle_s=5)
    assert sorted(b for b, _ in q.failed) == ["b001", "b002", "b003"]
    assert dict(q.failed)["b001"].startswith("LookupError: not listed")
    assert q.acked == ["b000", "b004", "b005"]
    assert stats["failed_batches"] == 3 and stats["batches"] == 3


def test_a_message_whose_part_exists_is_only_acked():
    q = FakeQueue(3)
    computed = []
    stats = make_loop(
        q,
        prepare=lambda d: None if d.batch_id == "b001" else Ready(fetched_of(d)),
        compute=lambda d, f: computed.append(d.batch_id) or [],
    ).run(max_idle_s=5)
    assert q.acked == ["b000", "b001", "b002"] and computed == ["b000", "b002"]
    assert stats["skipped_batches"] == 1 and stats["batches"] == 2


def test_a_message_over_its_time_limit_is_failed_and_its_result_dropped():
    q = FakeQueue(2)

    def compute(d, fetched):
        if d.batch_id == "b000":
            time.sleep(0.3)
        return []

    stats = make_loop(q, depth=1, timeout_s=0.1, compute=compute).run(max_idle_s=5)
    assert [b for b, _ in q.failed] == ["b000"] and "batch_timeout_s=0.1" in q.failed[0][1]
    assert q.acked == ["b001"]
    assert stats["timed_out_batches"] == 1


def test_held_messages_are_touched_and_an_ack_error_fails_the_run():
    q = FakeQueue(4)
    q.ack_many = lambda ds, w: (_ for _ in ()).throw(ConnectionError("redis gone"))  # type: ignore[method-assign]
    loop = make_loop(q, compute=lambda d, f: time.sleep(0.05) or [])
    with pytest.raises(ConnectionError, match="redis gone"):
        loop.run(max_idle_s=5)
    assert q.touched  # the heartbeat thread touched the held deliveries


def test_the_loop_stops_when_idle_too_long():
    q = FakeQueue(0)
    q.total = 1  # never finished
    t0 = time.monotonic()
    make_loop(q).run(max_idle_s=0.2)
    assert time.monotonic() - t0 < 5


def test_heartbeats_call_on_hung_when_a_result_never_comes():
    q = FakeQueue(1)
    [d] = q.claim("w", 1)
    hung = threading.Event()
    with Heartbeats(q, interval_s=0.01, timeout_s=0.05, grace_s=0.1, on_hung=hung.set) as beats:
        beats.hold(d)
        assert hung.wait(5)
        assert beats.timed_out(d)
    assert [b for b, _ in q.failed] == ["b000"]


def test_local_decoder_keeps_key_order_and_reports_errors_per_key():
    blobs = {f"k{i}": b"" if i % 3 else b"not an image" for i in range(7)}

    def read(key):
        if key == "k4":
            from patchaudit.errors import PatchauditError

            raise PatchauditError("gone")
        return blobs[key]

    dec = LocalDecoder(read, Preprocess(image_size=(32, 32)), threads=3)
    try:
        fetched = dec.submit(list(blobs)).result()
        assert [it.key for it in fetched.items] == list(blobs)
        assert all(it.image is None and it.error for it in fetched.items)
        assert "read failed" in fetched.items[4].error
        assert fetched.bytes_read == len(b"not an image") * 3
        assert dec.submit([]).result().items == []
    finally:
        dec.close()


def test_a_finished_delivery_can_no_longer_time_out():
    q = FakeQueue(2)
    a, b = q.claim("w", 2)
    with Heartbeats(q, interval_s=0.01, timeout_s=0.05, grace_s=60, on_hung=pytest.fail) as beats:
        beats.hold(a)
        beats.hold(b)
        assert beats.finish(a)  # about to be acked: the time limit no longer applies to it
        time.sleep(0.3)
        assert beats.timed_out(b) and not beats.finish(b)
        assert not beats.timed_out(a)
    assert [x for x, _ in q.failed] == ["b001"]
