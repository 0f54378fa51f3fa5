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
    """Keeps `delivery` claimed while the block runs; fails it after `timeout_s` (see module docstring)."""

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
        self.queue = queue
        self.delivery = delivery
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.on_hung = on_hung
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timed_out = threading.Event()
        self.beats = 0

    @property
    def timed_out(self) -> bool:
        """True once the batch was failed for exceeding its time limit: drop any late result."""
        return self._timed_out.is_set()

    def __enter__(self) -> Heartbeat:
        self._t0 = self._clock()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.delivery.batch_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        hung_at: float | None = None
        wait = min(self.interval_s, self.timeout_s)
        while not self._stop.wait(wait):
            now = self._clock()
            # Wake at the time limit, not up to one interval after it.
            wait = (
                self.interval_s
                if hung_at is not None
                else max(0.01, min(self.interval_s, self._t0 + self.timeout_s - now))
            )
            if hung_at is not None:
                if now >= hung_at:
                    log.error(
                        "batch %s: no return %.0fs after its time limit; the worker is hung, exiting",
                        self.delivery.batch_id,
                        self.grace_s,
                    )
                    self.on_hung()
                    return
                continue
            if now - self._t0 > self.timeout_s:
                self._expire()
                hung_at = now + self.grace_s
                continue
            try:
                self.beats += self.queue.touch([self.delivery]) > 0
            except Exception as exc:  # the client already retried; reclaim stays the safety net
                log.warning("batch %s: heartbeat failed: %s", self.delivery.batch_id, exc)

    def _expire(self) -> None:
        self._timed_out.set()
        reason = (
            f"batch took longer than run.batch_timeout_s={self.timeout_s:g}s "
            f"(worker {self.delivery.consumer}); its result is discarded"
        )
        try:
            outcome = self.queue.fail(self.delivery, reason)
            log.warning("batch %s: %s -> %s", self.delivery.batch_id, reason, getattr(outcome, "value", outcome))
        except Exception as exc:  # Redis trouble: the entry stays pending and is reclaimed after idle_ms
            log.warning("batch %s: could not fail the timed-out batch: %s", self.delivery.batch_id, exc)
