"""Decode on the cluster's CPUs: decode actors, and the feature worker's bounded client for them.

`run.decode: cluster`: the scheduler starts CPU-only `DecodeActor`s on any node with free CPUs (or the
nodes offering `run.decode_resource`). A feature worker asks them for its batches through a
`DecodeClient`, one device batch (`feature_batch` keys) per request; each answer is a `DecodedBatch`
(workers/decode_stage.py) that Ray keeps in the object store until the worker has scored it.

Backpressure: a client has at most `max_in_flight` requests at the actors or waiting to be scored;
more requests wait in the client as key lists (a few bytes), so the decoded pixels a worker holds stay
bounded however far ahead it asks. A request whose actor dies, or whose result is lost with its node,
is sent again to another actor (`retries` times), and then decoded in the worker itself: a decode
result is never lost, and since nothing is written before the batch is scored, never duplicated.

Thin shells: the decode is `decode_stage.decode_batch`, the worker's own decode path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from patchaudit.store.objects import open_store
from patchaudit.workers.decode import DEFAULT_MAX_PIXELS, Preprocess
from patchaudit.workers.decode_stage import Decoded, DecodedBatch, decode_batch, unpack
from patchaudit.workers.feature_loop import Fetched

log = logging.getLogger(__name__)


@ray.remote
class DecodeActor:
    """Reads and decodes batches of keys of one input store; CPU only.

    Started with max_concurrency=2 so `info` answers while a batch decodes; the decodes themselves
    run one at a time (each in `threads` threads), as many CPUs as the actor reserved.
    """

    def __init__(self, input_uri: str, threads: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.store = open_store(input_uri)
        self.threads = max(1, threads)
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self.busy = 0  # decodes running now (0 or 1)
        self.batches = 0
        self.images = 0

    def decode(self, keys: Sequence[str], prep: Preprocess) -> DecodedBatch:
        with self._lock:
            self.busy += 1
            try:
                out = decode_batch(self.store.read_bytes, keys, prep, self.threads, self.max_pixels)
            finally:
                self.busy -= 1
            self.batches += 1
            self.images += len(keys)
            return out

    def info(self) -> dict[str, Any]:
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "busy": self.busy,
            "batches": self.batches,
            "images": self.images,
            "cpu_s": time.process_time(),  # this process's CPU seconds, every thread
        }


@dataclass(eq=False)
class Ticket:
    """One request: its keys, and once sent, the actor and the pending result."""

    keys: tuple[str, ...]
    ref: Any = None  # ObjectRef of the DecodedBatch while at an actor
    actor: int = -1  # index of the actor it was sent to
    tried: list[int] = field(default_factory=list)  # actors that failed it


class DecodeClient:
    """A feature worker's requests to the decode actors, at most `max_in_flight` at a time."""

    def __init__(
        self,
        actors: Sequence[Any],
        prep: Preprocess,
        max_in_flight: int,
        local: Callable[[Sequence[str]], list[Decoded]],
        retries: int = 3,
        start: int = 0,
    ) -> None:
        if not actors:
            raise ValueError("cluster decode needs at least one decode actor")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.actors = list(actors)
        self.prep = prep
        self.max_in_flight = max_in_flight
        self.local = local  # the worker's own decode: the last resort when every try failed
        self.retries = retries
        self._next = start % len(self.actors)
        self._load = [0] * len(self.actors)  # requests at each actor from this client
        self._waiting: deque[Ticket] = deque()  # not sent yet (the bound was reached)
        self._out: list[Ticket] = []  # sent, not yet taken by `result`/`cancel`
        self.stats: dict[str, Any] = {
            "requests": 0,
            "retries": 0,
            "local_decodes": 0,
            "peak_in_flight": 0,
            "wait_s": 0.0,
        }

    @property
    def in_flight(self) -> int:
        return len(self._out)

    def submit(self, keys: Sequence[str]) -> Ticket:
        """Ask for `keys` decoded; sent now if the bound allows, else when an earlier one is taken."""
        t = Ticket(tuple(keys))
        self.stats["requests"] += 1
        self._waiting.append(t)
        self._fill()
        return t

    def result(self, t: Ticket) -> list[Decoded]:
        """The decoded images of `t`, in key order (waits for them; redoes a lost one)."""
        if t.ref is None:  # still waiting: earlier tickets were neither taken nor cancelled; send it now
            self._waiting.remove(t)
            self._send(t)
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    batch: DecodedBatch = ray.get(t.ref)
                    return unpack(batch)
                except ray.exceptions.RayError as exc:  # actor died or restarting, node or object lost, task raised
                    if not self._retry(t, exc):
                        self.stats["local_decodes"] += 1
                        return self.local(t.keys)
        finally:
            self.stats["wait_s"] += time.perf_counter() - t0
            self._done(t)

    def cancel(self, t: Ticket) -> None:
        """Give up `t` (its batch failed): frees its place in the bound."""
        if t.ref is None:
            if t in self._waiting:
                self._waiting.remove(t)
            return
        self._done(t)

    def decode_iter(self, keys: Sequence[str], size: int) -> Iterator[list[Decoded]]:
        """`keys` in requests of `size`, all submitted at once (the bound holds), yielded in order."""
        tickets = [self.submit(keys[i : i + size]) for i in range(0, len(keys), size)]
        try:
            for t in tickets:
                yield self.result(t)
        finally:  # stopped early (a failure): free the rest
            for t in tickets:
                self.cancel(t)

    # ------------------------------------------------------------------ internals

    def _fill(self) -> None:
        while self._waiting and len(self._out) < self.max_in_flight:
            self._send(self._waiting.popleft())

    def _send(self, t: Ticket) -> None:
        i = self._pick(t.tried)
        t.actor, t.ref = i, self.actors[i].decode.remote(list(t.keys), self.prep)
        self._load[i] += 1
        self._out.append(t)
        self.stats["peak_in_flight"] = max(self.stats["peak_in_flight"], len(self._out))

    def _pick(self, avoid: Sequence[int]) -> int:
        """The least loaded actor (round robin among equals), other than `avoid` while others exist."""
        n = len(self.actors)
        order = [(self._next + j) % n for j in range(n)]
        allowed = [i for i in order if i not in avoid] or order
        i = min(allowed, key=lambda a: self._load[a])
        self._next = (i + 1) % n
        return i

    def _done(self, t: Ticket) -> None:
        if t in self._out:
            self._out.remove(t)
            self._load[t.actor] -= 1
        t.ref = None
        self._fill()

    def _retry(self, t: Ticket, exc: BaseException) -> bool:
        """Send `t` again to another actor after `exc`; False when its tries are used up."""
        log.warning("decode of %d key(s) on decode actor %d failed (%s); redoing it", len(t.keys), t.actor, exc)
        self._load[t.actor] -= 1
        t.tried.append(t.actor)
        self._out.remove(t)
        if len(t.tried) > self.retries:
            log.warning(
                "decode of %d key(s) failed %d times on decode actors; decoding it here", len(t.keys), len(t.tried)
            )
            t.ref = None
            return False
        self.stats["retries"] += 1
        self._send(t)
        return True


class MessagePending:
    """A queue message's requests to the decode actors, as the feature loop's Pending (workers.feature_loop)."""

    def __init__(self, fetcher: MessageFetcher, tickets: list[Ticket]) -> None:
        self.fetcher = fetcher
        self.tickets = tickets

    def result(self, timeout: float | None = None) -> Fetched:
        client, items = self.fetcher.client, []
        with self.fetcher.lock:
            try:
                for t in self.tickets:
                    items += client.result(t)
            finally:  # stopped early (a failure): free the rest
                for t in self.tickets:
                    client.cancel(t)
        return Fetched(items)


class MessageFetcher:
    """The feature loop's fetch stage over a `DecodeClient`: `submit(keys)` sends a message's keys in
    requests of `size` (the client's bound holds). The loop submits from its feeder thread and takes
    results in its compute thread; the client is not thread-safe, so both go through one lock."""

    def __init__(self, client: DecodeClient, size: int) -> None:
        self.client = client
        self.size = max(1, size)
        self.lock = threading.Lock()

    def submit(self, keys: Sequence[str]) -> MessagePending:
        keys = list(keys)
        with self.lock:
            tickets = [self.client.submit(keys[i : i + self.size]) for i in range(0, len(keys), self.size)]
        return MessagePending(self, tickets)

    def close(self) -> None:
        pass
