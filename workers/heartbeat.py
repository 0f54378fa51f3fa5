"""A worker's claim kept alive while it works, and a time limit on each batch.

`Heartbeat(queue, delivery, ...)` is a context manager around the work on one delivery. A thread
touches the delivery (resets its idle time in Redis) every `interval_s`, so `claim` never reclaims a
batch from a worker that is alive, however long the batch takes. After `timeout_s` the batch is
failed (`queue.fail`: retried after a backoff, or dead-lettered at max_attempts) and the worker's
own result for it is discarded (`timed_out`). If the work still has not returned `grace_s` later, the
worker is presumed hung and `on_hung` is called (by default the process exits, so the scheduler
replaces it: a thread stuck in native code cannot be stopped any other way).

No Redis or Ray import here: the queue is passed in.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EXIT_HUNG = 70  # process exit code of a worker that stayed hung past the grace period


def interval_for(idle_ms: int) -> float:
    """Heartbeat period for a reclaim timeout: five beats per timeout, at most every 10 s apart."""
    return max(0.05, min(10.0, idle_ms / 5000.0))


def _exit_hung() -> None:
    os._exit(EXIT_HUNG)


class Heartbeat:
    """Keeps `delivery` claimed while the block runs; fails it after `timeout_s` (see module docstring).

    The one-delivery form of `Heartbeats` (same beats, time limit and hang detection)."""

    def __init__(
        self,
        queue: Any,
        delivery: Any,
        interval_s: float,
        timeout_s: float,
        grace_s: float = 30.0,
        on_hung: Callable[[], None] = _exit_hung,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.delivery = delivery
        self._beats = Heartbeats(queue, interval_s, timeout_s, grace_s, on_hung, clock)

    @property
    def timed_out(self) -> bool:
        """True once the batch was failed for exceeding its time limit: drop any late result."""
        return self._beats.timed_out(self.delivery)

    @property
    def beats(self) -> int:
        return self._beats.beats

    def __enter__(self) -> Heartbeat:
        self._beats.hold(self.delivery)
        self._beats.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._beats.stop()


class Heartbeats:
    """One heartbeat thread for every delivery a worker holds at once (claimed ahead, on the device,
    being committed): `hold` when claimed, `drop` when acked, failed or given back.

    Every `interval_s` one `queue.touch` call resets the idle time of all held deliveries. A delivery
    held longer than `timeout_s` since its claim (the time it waited behind the worker's other held
    batches included) is failed like `Heartbeat` does, and `timed_out(d)` turns True so that no stage
    commits a late result; if it is still held `grace_s` after that, `on_hung` is called.
    """

    def __init__(
        self,
        queue: Any,
        interval_s: float,
        timeout_s: float,
        grace_s: float = 30.0,
        on_hung: Callable[[], None] = _exit_hung,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.on_hung = on_hung
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, tuple[Any, float]] = {}  # entry id -> (delivery, claim time)
        self._expired: dict[str, float] = {}  # entry id -> time it was failed for its time limit
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0

    def start(self) -> Heartbeats:
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Heartbeats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hold(self, delivery: Any) -> None:
        with self._lock:
            self._held[delivery.entry_id] = (delivery, self._clock())
        self._wake.set()  # the time limit of a new delivery may come first

    def drop(self, delivery: Any) -> None:
        with self._lock:
            self._held.pop(delivery.entry_id, None)
            self._expired.pop(delivery.entry_id, None)

    def finish(self, delivery: Any) -> bool:
        """Stop watching `delivery` before acking it: False if it already timed out (then do not ack).

        After a True the time limit can no longer fail it, so a late failure cannot race the ack."""
        with self._lock:
            if delivery.entry_id in self._expired:
                return False
            self._held.pop(delivery.entry_id, None)
            return True

    def timed_out(self, delivery: Any) -> bool:
        """True once `delivery` was failed for exceeding its time limit: drop any late result."""
        with self._lock:
            return delivery.entry_id in self._expired

    def held(self) -> list[Any]:
        with self._lock:
            return [d for d, _ in self._held.values()]

    def _run(self) -> None:
        next_beat = self._clock() + self.interval_s
        while not self._stop.is_set():
            now = self._clock()
            expire: list[Any] = []
            hung = False
            with self._lock:
                live = [(d, t0) for eid, (d, t0) in self._held.items() if eid not in self._expired]
                for d, t0 in live:
                    if now - t0 > self.timeout_s:
                        self._expired[d.entry_id] = now
                        expire.append(d)
                hung = any(now - t > self.grace_s for t in self._expired.values())
                gone = {d.entry_id for d in expire}
                deadlines = [t0 + self.timeout_s for d, t0 in live if d.entry_id not in gone]
                deadlines += [t + self.grace_s for t in self._expired.values()]
            if hung:
                log.error(
                    "a batch did not return %.0fs after its time limit; the worker is hung, exiting", self.grace_s
                )
                self.on_hung()
                return
            for d in expire:
                _expire(self.queue, d, self.timeout_s)
            if now >= next_beat:
                touch = [d for d, _ in live if d.entry_id not in gone]
                if touch:
                    try:
                        self.beats += self.queue.touch(touch) > 0
                    except Exception as exc:  # the client already retried; reclaim stays the safety net
                        log.warning("heartbeat of %d held batch(es) failed: %s", len(touch), exc)
                next_beat = now + self.interval_s
            wait = min([next_beat, *deadlines]) - self._clock()
            self._wake.wait(max(0.005, wait))
            self._wake.clear()


def _expire(queue: Any, delivery: Any, timeout_s: float) -> None:
    reason = (
        f"batch took longer than run.batch_timeout_s={timeout_s:g}s "
        f"(worker {delivery.consumer}); its result is discarded"
    )
    try:
        outcome = queue.fail(delivery, reason)
        log.warning("batch %s: %s -> %s", delivery.batch_id, reason, getattr(outcome, "value", outcome))
    except Exception as exc:  # Redis trouble: the entry stays pending and is reclaimed after idle_ms
        log.warning("batch %s: could not fail the timed-out batch: %s", delivery.batch_id, exc)
