"""A feature worker's loop as three overlapping stages: fetch ahead, compute, commit behind.

    feeder thread   claims messages while fewer than `depth` are held (all stages together), checks
                    each (`prepare`: listing, a part already written) and starts its fetch, a
                    `Pending` whose `result()` is the message's decoded images (`Fetched`).
    calling thread  takes the fetched messages in claim order, waits for their images and scores them
                    on the device (`compute`), then hands the results to the commit stage.
    writer threads  write the messages' parts (`commit`: rows, embeddings, the Parquet part), two
                    at a time: one part is encoded while another is being made durable (fsync, or
                    an upload), which would otherwise leave the worker's core idle.
    ack thread      acks in claim order, each message after its part, every written part at the
                    head of the line in one round trip.

So while one message is on the device, the next ones are claimed, read and decoded and the previous
ones are written and acked. The delivery protocol is the same as one message at a time: a message is
acked only after its part is written; any failure fails it (retry, dead letter); one `Heartbeats`
thread keeps every held message claimed and fails a message held longer than its time limit, whose
result is then dropped by whichever stage holds it. SIGTERM gives back everything the worker holds
(`BatchQueue.release` works per consumer). `depth=1` runs one message at a time.

The seam for decoding elsewhere (e.g. CPU-only decode actors): `prepare` may return any object with
`result()`; `LocalDecoder` is the in-process one (a thread pool). No Ray, Redis or queue import here.
"""

from __future__ import annotations

import logging
import queue as queues
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from patchaudit.workers.decode import DEFAULT_MAX_PIXELS, Preprocess
from patchaudit.workers.decode_stage import Decoded, _decode_one  # torch-free: decode actors import this module
from patchaudit.workers.heartbeat import Heartbeats

log = logging.getLogger(__name__)


@dataclass
class Fetched:
    """A message's images, in the message's key order: decoded pixels or the error of each key."""

    items: list[Decoded]
    bytes_read: int = 0


class Pending(Protocol):
    """A fetch under way (a `concurrent.futures.Future`, or a wrapper around a Ray ObjectRef)."""

    def result(self, timeout: float | None = None) -> Fetched: ...


class Ready:
    """A Pending that is already resolved."""

    def __init__(self, value: Fetched) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> Fetched:
        return self.value


class _Gathered:
    """The chunks of one message decoded by several threads, as one Pending."""

    def __init__(self, futures: list[Future]) -> None:
        self.futures = futures

    def result(self, timeout: float | None = None) -> Fetched:
        items: list[Decoded] = []
        n_bytes = 0
        for f in self.futures:
            chunk, b = f.result(timeout)
            items += chunk
            n_bytes += b
        return Fetched(items, n_bytes)


def _decode_chunk(
    read: Callable[[str], bytes], keys: Sequence[str], prep: Preprocess, max_pixels: int
) -> tuple[list[Decoded], int]:
    n_bytes = 0

    def counted(key: str) -> bytes:
        nonlocal n_bytes
        data = read(key)
        n_bytes += len(data)
        return data

    return [_decode_one(counted, k, prep, max_pixels) for k in keys], n_bytes


class LocalDecoder:
    """Reads and decodes messages in this process: each message cut into `threads` contiguous chunks,
    one task each, in one long-lived pool (messages are decoded in the order they are submitted).

    `gpu_decode`: a function (keys -> list[Decoded]) that decodes on the device instead (JPEGs on a
    GPU, workers.pipeline.decode_batches_gpu); it runs in the pool's threads, one task per message.
    """

    def __init__(
        self,
        read: Callable[[str], bytes],
        prep: Preprocess,
        threads: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        gpu_decode: Callable[[Sequence[str]], list[Decoded]] | None = None,
    ) -> None:
        self.read = read
        self.prep = prep
        self.threads = max(1, threads)
        self.max_pixels = max_pixels
        self.gpu_decode = gpu_decode
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode")

    def submit(self, keys: Sequence[str]) -> Pending:
        keys = list(keys)
        if not keys:
            return Ready(Fetched([]))
        if self.gpu_decode is not None:
            gpu = self.gpu_decode
            return _Gathered([self._pool.submit(lambda: (gpu(keys), 0))])
        step = -(-len(keys) // min(self.threads, len(keys)))  # ceil: at most `threads` chunks
        return _Gathered(
            [
                self._pool.submit(_decode_chunk, self.read, keys[s : s + step], self.prep, self.max_pixels)
                for s in range(0, len(keys), step)
            ]
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Job:
    delivery: Any
    pending: Pending | None = None  # None: nothing to compute (the part exists already: ack only)
    error: BaseException | None = None  # failed before its fetch started: fail it


_END = object()


class FeatureLoop:
    """Runs the stages (module docstring) until the run is finished. One loop per worker.

    prepare(delivery) -> Pending | None    check the message and start its fetch (None: part exists)
    compute(delivery, Fetched) -> results  score on the device
    commit(delivery, results) -> None      write the part (and what comes before it)

    Redis round trips are shared: while messages are held, the feeder claims only when at least half
    of `depth` is free (one claim for several messages), and the ack thread acks every message whose
    part was written since its last ack in one pipelined call (`queue.ack_many`). `writers`: parts
    written at once (at most `depth`); `commit` is called from that many threads.
    """

    def __init__(
        self,
        queue: Any,
        name: str,
        prepare: Callable[[Any], Pending | None],
        compute: Callable[[Any, Fetched], Any],
        commit: Callable[[Any, Any], None],
        beats: Heartbeats,
        depth: int = 3,
        stats: dict[str, Any] | None = None,
        writers: int = 2,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if writers < 1:
            raise ValueError(f"writers must be >= 1, got {writers}")
        self.queue = queue
        self.name = name
        self.prepare = prepare
        self.compute = compute
        self.commit = commit
        self.beats = beats
        self.depth = depth
        self.min_claim = max(1, depth // 2)
        self.writers = min(writers, depth)
        self.stats = stats if stats is not None else {}
        for k in ("batches", "images", "failed_batches", "skipped_batches", "timed_out_batches", "claims", "acks"):
            self.stats.setdefault(k, 0)
        self._lock = threading.Lock()
        self._room = threading.Condition()
        self._held = 0  # deliveries claimed and not yet acked, failed or dropped
        self._ready: queues.Queue[Any] = queues.Queue()  # (claim order) _Job, then _END
        self._written: queues.Queue[Any] = queues.Queue()  # (claim order) (delivery, skipped, Future), then _END
        self._stop = threading.Event()
        self._errors: list[BaseException] = []  # Redis lost in the feeder or at an ack: run() raises it

    # ---- bookkeeping -------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _done(self, d: Any) -> None:
        """`d` is no longer held by this worker's stages (acked, failed, dropped)."""
        self.beats.drop(d)
        with self._room:
            self._held -= 1
            self._room.notify_all()

    def _fail(self, d: Any, exc: BaseException) -> None:
        self._count("failed_batches")
        log.warning("%s: batch %s failed: %r", self.name, d.batch_id, exc)
        try:
            self.queue.fail(d, f"{type(exc).__name__}: {exc}"[:2000])
        finally:
            self._done(d)

    def _dropped_if_timed_out(self, d: Any) -> bool:
        """True (and `d` let go) when the heartbeat already failed `d` for its time limit."""
        if not self.beats.timed_out(d):
            return False
        self._count("timed_out_batches")
        self._done(d)
        return True

    def _abort(self, exc: BaseException) -> None:
        self._errors.append(exc)
        self._stop.set()

    # ---- feeder ------------------------------------------------------------------------------

    def _room_to_claim(self) -> int:
        """Wait until a claim is worth it: nothing held, or at least `min_claim` free; 0 when stopping."""
        with self._room:
            while not self._stop.is_set():
                free = self.depth - self._held
                if free >= (1 if self._held == 0 else self.min_claim):
                    return free
                self._room.wait(0.1)
        return 0

    def _feed(self, max_idle_s: float) -> None:
        last_work = time.monotonic()
        try:
            while True:
                n = self._room_to_claim()
                if not n:
                    break
                idle = n == self.depth  # nothing held: the run may be over
                if idle and self.queue.is_finished():
                    break
                deliveries = self.queue.claim(self.name, count=n)
                self._count("claims")
                if not deliveries:
                    if idle and time.monotonic() - last_work > max_idle_s:
                        break
                    continue
                last_work = time.monotonic()
                with self._room:
                    self._held += len(deliveries)
                for d in deliveries:
                    self.beats.hold(d)
                    job = _Job(d)
                    try:
                        job.pending = self.prepare(d)
                    except Exception as exc:  # a batch-level failure: the queue decides retry or dead letter
                        job.error = exc
                    self._ready.put(job)
        except BaseException as exc:  # Redis lost (after the client's retries): the run() call fails with it
            self._abort(exc)
        finally:
            self._ready.put(_END)

    # ---- write and ack ----------------------------------------------------------------------

    def _write(self, d: Any, results: Any) -> bool:
        """In a writer thread: `d`'s part (unless it exists: `_SKIP`); True when `d` is to be acked."""
        if results is not _SKIP:
            if self._dropped_if_timed_out(d):
                return False
            try:
                self.commit(d, results)
            except Exception as exc:
                self._fail(d, exc)
                return False
        if self.beats.finish(d):  # from here on the time limit cannot fail it
            return True
        self._dropped_if_timed_out(d)  # failed meanwhile (retried elsewhere): no ack
        return False

    def _ack_loop(self) -> None:
        """Acks in claim order, each after its part; every written part at the head of the line in one
        round trip (a part written early waits for the older ones)."""
        line: deque[Any] = deque()
        while True:
            if not line:
                line.append(self._written.get())
            while True:  # whatever else was handed over meanwhile
                try:
                    line.append(self._written.get_nowait())
                except queues.Empty:
                    break
            if line[0] is _END:
                return
            line[0][2].result()  # the oldest message's part
            ready = []
            while line and line[0] is not _END and line[0][2].done():
                ready.append(line.popleft())
            to_ack = [(d, skipped) for d, skipped, written in ready if written.result()]
            if not to_ack:
                continue
            try:
                self.queue.ack_many([d for d, _ in to_ack], self.name)
            except BaseException as exc:  # Redis lost: stop claiming; run() raises it
                self._abort(exc)
                return
            self._count("acks")
            for d, skipped in to_ack:
                if skipped:
                    self._count("skipped_batches")
                else:
                    self._count("batches")
                    self._count("images", len(d.message.keys))
                self._done(d)

    # ---- compute (the calling thread) --------------------------------------------------------

    def run(self, max_idle_s: float = 3600.0) -> dict[str, Any]:
        """Work until every batch of the run is finished (acked or dead-lettered); returns the stats."""
        feeder = threading.Thread(target=self._feed, args=(max_idle_s,), name="feeder", daemon=True)
        acker = threading.Thread(target=self._ack_loop, name="ack", daemon=True)
        writers = ThreadPoolExecutor(max_workers=self.writers, thread_name_prefix="commit")
        self.beats.start()
        feeder.start()
        acker.start()
        try:
            while True:
                job = self._ready.get()
                if job is _END or self._errors:
                    break
                d = job.delivery
                if job.error is not None:
                    self._fail(d, job.error)
                    continue
                if job.pending is None:
                    self._written.put((d, True, writers.submit(self._write, d, _SKIP)))
                    continue
                try:
                    fetched = job.pending.result()
                    if self._dropped_if_timed_out(d):
                        continue
                    results = self.compute(d, fetched)
                except Exception as exc:
                    self._fail(d, exc)
                    continue
                self._written.put((d, False, writers.submit(self._write, d, results)))
        finally:
            self._stop.set()
            self._written.put(_END)
            acker.join()
            writers.shutdown(wait=True)
            feeder.join()
            self.beats.stop()
        if self._errors:
            raise self._errors[0]
        return self.stats


_SKIP = object()
