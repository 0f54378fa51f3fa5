"""The delivery protocol of one run over Redis Streams: enqueue, claim, ack, fail, reclaim, dead-letter.

Keys of run R (see `RunKeys`):
    patchaudit:R:batches   stream of BatchMessage, consumer group "workers". A finished entry is
                           XACKed and XDELed, so the stream holds only unfinished work.
    patchaudit:R:dead      stream of DeadLetter (batch gave up on, with the reason).
    patchaudit:R:done      hash batch_id -> {"status": "ok"|"dead", "worker", "ts"}. Written once
                           (HSETNX): the per-batch idempotency record that makes ack and resume safe.
    patchaudit:R:attempts  hash batch_id -> failed or abandoned tries. Every enqueued batch has a
                           field, so its length is the run's batch count.
    patchaudit:R:retry     sorted set of encoded BatchMessage scored by due time (Redis clock).
    patchaudit:R:meta      hash: total, done_ok, dead, updated, state (starting|running|finished|failed),
                           error (why a failed run stopped).

Lifecycle of a batch:
    enqueue --XADD--> stream --claim: XREADGROUP ">"--> consumer --ack--> done "ok"
                         ^          claim: XAUTOCLAIM of entries idle > idle_ms (attempt + 1;
                         |                 at max_attempts --> dead letter)
                         |      fail: attempt + 1 --> retry set (backoff) or, at max_attempts, dead
                         +-- claim moves due retries from the retry set back into the stream

Backoff is applied by the queue, not by a sleeping worker: a failed batch waits in the retry set
and re-enters the stream when due. A worker never holds an entry it is not working on, so a backoff
can never make a live entry look stuck and get reclaimed.

Steps that must not interleave run as short Lua scripts: Redis executes a script atomically like
MULTI/EXEC, and unlike MULTI it can branch, which keeps acks idempotent and the counters exact.
Redis server errors (connection lost, ...) are not wrapped: a worker loop decides whether to retry.
The client's socket_timeout, if set, must exceed block_ms. The scripts touch several keys of a run,
so on Redis Cluster the key names would need a hash tag (patchaudit:{R}:...); a single Redis needs none.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from itertools import islice
from typing import Any, ClassVar

import redis
from redis.exceptions import ResponseError

from patchaudit.errors import PatchauditError
from patchaudit.queue.messages import BatchMessage, DeadLetter, MessageError, check_id
from patchaudit.queue.pipelined import Pipelined
from patchaudit.schema import Schema, opt

log = logging.getLogger(__name__)

GROUP = "workers"
FIELD = "msg"  # the one field of a stream entry: the encoded message
MAX_REASON_CHARS = 2000
STATES = ("starting", "running", "finished", "failed")
_CONSUMER = re.compile(r"[A-Za-z0-9_.:@/-]{1,200}")


class QueueError(PatchauditError):
    """The queue was used wrongly (wrong run, bad consumer name) or the run's queue is gone."""


@dataclass(frozen=True)
class QueueOptions(Schema):
    """Delivery settings. A worker keeps its entries alive with `touch` (a heartbeat) while it works."""

    schema_path: ClassVar[str] = "queue option "

    idle_ms: int = opt(
        60_000, "a claimed entry not touched (heartbeat) this long is presumed abandoned and reclaimed", ge=1
    )
    max_attempts: int = opt(3, "tries per batch, reclaims included; then it is dead-lettered", ge=1)
    block_ms: int = opt(2_000, "how long claim() waits for new work when there is none", ge=0)
    backoff_s: float = opt(2.0, "first retry delay; doubles per attempt", ge=0, lt=1e6, noun="seconds")
    backoff_max_s: float = opt(60.0, "longest retry delay", ge=0, lt=1e6, noun="seconds")

    def delay_s(self, attempt: int) -> float:
        """Backoff before try number `attempt` (1 = first retry): backoff_s * 2**(attempt-1), capped."""
        return min(self.backoff_max_s, self.backoff_s * 2.0 ** min(attempt - 1, 60))


@dataclass(frozen=True)
class RunKeys:
    """The Redis keys of one run (module docstring: what each holds)."""

    stream: str
    dead: str
    done: str
    attempts: str
    retry: str
    meta: str

    @classmethod
    def of(cls, run_id: str) -> RunKeys:
        p = f"patchaudit:{check_id('run_id', run_id)}:"
        return cls(p + "batches", p + "dead", p + "done", p + "attempts", p + "retry", p + "meta")

    def all(self) -> tuple[str, ...]:
        return (self.stream, self.dead, self.done, self.attempts, self.retry, self.meta)


@dataclass(frozen=True)
class Delivery:
    """A batch handed to one consumer; pass it back to `ack` or `fail`."""

    entry_id: str  # stream entry id, e.g. "1718000000000-0"
    message: BatchMessage  # .attempt is the queue's current attempt count for the batch
    delivery_count: int  # times Redis delivered this entry (1 = first delivery)
    consumer: str

    @property
    def batch_id(self) -> str:
        return self.message.batch_id

    @property
    def attempt(self) -> int:
        return self.message.attempt


class FailOutcome(str, Enum):
    RETRY = "retry"  # queued again after a backoff
    DEAD = "dead"  # max_attempts reached: dead-lettered
    STALE = "stale"  # the entry was no longer ours (reclaimed by another consumer): nothing done
    DONE = "done"  # the batch was already finished elsewhere: the entry was only acked


@dataclass(frozen=True)
class Progress:
    total: int  # batches enqueued for the run
    done_ok: int
    dead: int
    pending: int  # not finished and not held by a consumer: queued or waiting out a backoff
    in_flight: int  # entries delivered to a consumer and not yet acked


# Recount the meta counters from the done records, atomically (acks may land meanwhile).
# KEYS: done, meta. ARGV: total, timestamp.
_RECOUNT = """
local ok, dead = 0, 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  local status = cjson.decode(v)['status']
  if status == 'ok' then ok = ok + 1 elseif status == 'dead' then dead = dead + 1 end
end
redis.call('HSET', KEYS[2], 'total', ARGV[1], 'done_ok', ok, 'dead', dead, 'updated', ARGV[2])
return {ok, dead}
"""

# Move due retries into the stream. Returns ms until the next retry is due, -1 if none is left.
# KEYS: retry, stream. ARGV: how many to move at most.
_PROMOTE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('XADD', KEYS[2], '*', 'msg', m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return -1 end
return math.max(0, math.ceil((tonumber(nxt[2]) - now) * 1000))
"""

# Finish an entry: record the batch's outcome once, count it once, dead-letter it once, then
# XACK + XDEL the entry (always, so repeating a finish is harmless). Returns 1 if this call
# recorded the outcome, 0 if the batch was already finished (or no batch id was given).
# KEYS: stream, done, meta, dead. ARGV: group, entry id, batch id ('' = none: a malformed entry),
# done record, meta counter to increment, dead-letter payload ('' = none).
_FINISH = """
local first = 0
if ARGV[3] ~= '' then
  first = redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[4])
  if first == 1 then redis.call('HINCRBY', KEYS[3], ARGV[5], 1) end
end
if ARGV[6] ~= '' and (first == 1 or ARGV[3] == '') then
  redis.call('XADD', KEYS[4], '*', 'msg', ARGV[6])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return first
"""

# Record a failed try of an entry held by a consumer. Returns the new attempt count; -1 if the
# consumer no longer holds the entry (reclaimed or acked elsewhere); -2 if the batch is already done
# (the entry is acked). At max_attempts the entry stays pending and the caller dead-letters it;
# below, the retry goes to the retry set, due after the backoff, and the entry is acked.
# KEYS: stream, attempts, done, retry. ARGV: group, entry id, consumer, batch id, max_attempts,
# backoff seconds, retry payload.
_FAIL = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[3], ARGV[4]) == 1 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
  return -2
end
local n = redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
if n >= tonumber(ARGV[5]) then return n end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[4], tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[6]), ARGV[7])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return n
"""


# Keep entries held by a consumer alive: reset their idle time (XCLAIM to itself, JUSTID: the delivery
# count is not raised) for each entry the consumer still holds. Returns how many it still holds.
# KEYS: stream. ARGV: group, consumer, entry ids...
_TOUCH = """
local n = 0
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""

# Give back entries a consumer holds without counting a try: queue a copy as new work, then XACK +
# XDEL the held entry. Entries the consumer no longer holds are left alone. Returns how many moved.
# KEYS: stream. ARGV: group, consumer, entry ids...
_RELEASE = """
local n = 0
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
    if #e > 0 then
      redis.call('XADD', KEYS[1], '*', unpack(e[1][2]))
      n = n + 1
    end
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
  end
end
return n
"""


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _chunks(items: Iterable[BatchMessage], size: int) -> Iterator[list[BatchMessage]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _done_record(status: str, worker: str) -> str:
    return json.dumps(
        {"status": status, "ts": round(time.time(), 3), "worker": worker}, sort_keys=True, separators=(",", ":")
    )


def _check_consumer(consumer: object) -> str:
    if not isinstance(consumer, str) or not _CONSUMER.fullmatch(consumer):
        raise QueueError(f"consumer/worker name must be 1-200 characters of [A-Za-z0-9_.:@/-], got {consumer!r}")
    return consumer


class BatchQueue:
    """The batch queue of one run. Pass an explicit client; nothing here is global.

    Works with `decode_responses` on or off.
    """

    def __init__(self, client: redis.Redis, run_id: str, options: QueueOptions | None = None):
        self._r = client
        self.run_id = check_id("run_id", run_id)
        self.options = options or QueueOptions()
        self.keys = RunKeys.of(run_id)
        self._group_ready = False
        self._reclaim_cursor = "0-0"  # XAUTOCLAIM scan position; wraps to 0-0 at the end of the PEL
        self._promote = client.register_script(_PROMOTE)
        self._finish = client.register_script(_FINISH)
        self._fail = client.register_script(_FAIL)
        self._recount = client.register_script(_RECOUNT)
        self._touch = client.register_script(_TOUCH)
        self._release = client.register_script(_RELEASE)

    # ---- setup -------------------------------------------------------------------------------

    def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (idempotent)."""
        try:
            # id "0": a group created after the first XADD still delivers every entry.
            self._r.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def _ready(self) -> None:
        if not self._group_ready:
            self.ensure_group()

    # ---- producer ----------------------------------------------------------------------------

    def enqueue(self, batches: Iterable[BatchMessage], chunk_size: int = 500) -> int:
        """Queue the batches that are neither done nor already queued; return how many were queued.

        Calling it again with the same plan (a resumed run) queues only the missing batches.
        The run's total in the meta hash counts every batch ever enqueued.
        """
        self._ready()
        seen: set[str] = set()
        queued: set[str] | None = None  # batch ids with a live entry; scanned only if needed
        added = 0
        for chunk in _chunks(batches, chunk_size):
            for m in chunk:
                if not isinstance(m, BatchMessage):
                    raise QueueError(f"enqueue takes BatchMessage objects, got {type(m).__name__}")
                if m.run_id != self.run_id:
                    raise QueueError(
                        f"batch {m.batch_id} belongs to run {m.run_id!r}, not to this queue's run {self.run_id!r}"
                    )
                if m.batch_id in seen:
                    raise QueueError(f"batch id {m.batch_id!r} appears twice in one plan")
                seen.add(m.batch_id)
            ids = [m.batch_id for m in chunk]
            pipe = self._r.pipeline(transaction=False)
            pipe.hmget(self.keys.done, ids)
            for bid in ids:
                pipe.hsetnx(self.keys.attempts, bid, 0)  # 1: first time this run sees the batch
            done, *new = pipe.execute()
            todo = []
            for m, is_done, is_new in zip(chunk, done, new):
                if is_done is not None:
                    continue
                if not is_new:  # known batch: queue it again only if its entry was lost
                    if queued is None:
                        queued = self._queued_batch_ids()
                    if m.batch_id in queued:
                        continue
                todo.append(m)
            if todo:
                pipe = self._r.pipeline(transaction=False)
                for m in todo:
                    pipe.xadd(self.keys.stream, {FIELD: m.encode()})
                pipe.execute()
            added += len(todo)
        total = self._r.hlen(self.keys.attempts)
        self._r.hset(self.keys.meta, mapping={"total": total, "updated": round(time.time(), 3)})
        return added

    def reconcile(self, batch_ids: Iterable[str], finished: Iterable[str]) -> list[str]:
        """Make Redis agree with the report before (re)queuing: `finished` (batches with a part) is the truth.

        - a finished batch is recorded done, so a stale entry of it is dropped, never redone;
        - an unfinished batch keeps no "ok" record (its result is gone: report deleted, or Redis lost
          and then a late ack), and a "dead" record only while its dead letter is in the dead stream
          (the scheduler turns it into error rows); so it is queued again;
        - every planned batch has an attempts field, and the meta counters are recounted from the
          records in one atomic step: `total` is the plan's batch count whatever Redis lost.
        Returns the batch ids whose done records were dropped.
        """
        ids = list(dict.fromkeys(batch_ids))
        planned, finished = set(ids), set(finished)
        records = {_s(k): json.loads(v) for k, v in self._r.hgetall(self.keys.done).items()}
        lettered = {d.batch_id for d in self.dead_letters()}
        drop = sorted(
            b
            for b, rec in records.items()
            if b not in planned or (b not in finished and (rec.get("status") == "ok" or b not in lettered))
        )
        pipe = self._r.pipeline(transaction=False)
        if drop:
            pipe.hdel(self.keys.done, *drop)
        for bid in sorted(finished & planned):
            pipe.hsetnx(self.keys.done, bid, _done_record("ok", "report"))
        for bid in ids:
            pipe.hsetnx(self.keys.attempts, bid, 0)
        pipe.execute()
        self._recount(keys=[self.keys.done, self.keys.meta], args=[len(ids), round(time.time(), 3)])
        if drop:
            log.warning(
                "run %s: %d batch(es) recorded as finished have no report part; they will be redone",
                self.run_id,
                len(drop),
            )
        return drop

    def mark_starting(self, ttl_s: int) -> bool:
        """Record that the run is starting (before anything is queued), so `status` can say so.

        Returns True if this created the run's meta record (a new run), False for a known run.
        The record expires after `ttl_s` unless the run goes on.
        """
        created = bool(self._r.hsetnx(self.keys.meta, "state", "starting"))
        if created:
            self._r.expire(self.keys.meta, ttl_s)
        return created

    def set_state(self, state: str) -> None:
        """Record the run's lifecycle state (`STATES`) in its meta hash; `status` shows it."""
        if state not in STATES:
            raise QueueError(f"run state must be one of {STATES}, got {state!r}")
        self._r.hset(self.keys.meta, "state", state)
        if state == "running":
            self._r.persist(self.keys.meta)

    def set_error(self, reason: str | None) -> None:
        """Record why the run stopped early (None clears it); `status` shows it."""
        if reason is None:
            self._r.hdel(self.keys.meta, "error")
        else:
            self._r.hset(self.keys.meta, mapping={"error": reason[:MAX_REASON_CHARS], "updated": round(time.time(), 3)})

    def expire(self, ttl_s: int) -> None:
        """Let every key of the run expire after `ttl_s` (a finished or failed run stays queryable that long)."""
        pipe = self._r.pipeline(transaction=False)
        for key in self.keys.all():
            pipe.expire(key, ttl_s)
        pipe.execute()

    def state(self) -> str | None:
        """The recorded lifecycle state, or None for a run that never recorded one."""
        value = self._r.hget(self.keys.meta, "state")
        return None if value is None else _s(value)

    def _queued_batch_ids(self) -> set[str]:
        """Batch ids that still have an entry in the stream (queued or in flight) or the retry set."""
        out: set[str] = set()
        payloads = [p for p in self._r.zrange(self.keys.retry, 0, -1)]
        start = "-"
        while page := self._r.xrange(self.keys.stream, min=start, max="+", count=1000):
            payloads += [fields.get(FIELD, fields.get(FIELD.encode())) for _, fields in page]
            start = "(" + _s(page[-1][0])
        for p in payloads:
            try:
                out.add(BatchMessage.decode(p).batch_id)
            except MessageError:
                pass  # a malformed entry is dead-lettered by whoever claims it
        return out

    # ---- consumer ----------------------------------------------------------------------------

    def claim(self, consumer: str, count: int = 1, block_ms: int | None = None) -> list[Delivery]:
        """Hand up to `count` batches to `consumer`: reclaimed stuck work first, then new work.

        Waits up to `block_ms` (default: options.block_ms) for new work when there is none.
        May return fewer than `count`, or none, even when work remains (e.g. a retry not yet due).
        """
        _check_consumer(consumer)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1000:
            raise QueueError(f"count must be an integer in [1, 1000], got {count!r}")
        self._ready()
        try:
            # Due retries into the stream and the scan for stuck entries: one round trip.
            p = Pipelined(self._r)
            p.script(self._promote, [self.keys.retry, self.keys.stream], [100])
            p.pipe.xautoclaim(
                self.keys.stream, GROUP, consumer, self.options.idle_ms, start_id=self._reclaim_cursor, count=count
            )
            promoted, reclaimed = p.execute()
            next_retry_ms = int(promoted)
            out = self._reclaim_stuck(consumer, reclaimed)
            if len(out) < count:
                block = self.options.block_ms if block_ms is None else block_ms
                if next_retry_ms >= 0:  # wake up when the next retry is due
                    block = min(block, next_retry_ms)
                # Wait for new work only when there is nothing to hand out yet.
                out += self._read_new(consumer, count - len(out), block if block > 0 and not out else None)
        except ResponseError as e:
            if "NOGROUP" in str(e):  # another process deleted the run
                raise QueueError(f"run {self.run_id!r} has no queue (deleted?): {e}") from None
            raise
        return out

    def _reclaim_stuck(self, consumer: str, reply: Any) -> list[Delivery]:
        """The entries XAUTOCLAIM took (idle > idle_ms: their consumer died or hangs). Each reclaim is a try."""
        self._reclaim_cursor = _s(reply[0])
        entries = [(_s(eid), fields) for eid, fields in reply[1] if fields]  # Redis 6.2: nil if XDELed
        if not entries:
            return []
        pipe = self._r.pipeline(transaction=False)
        for eid, _ in entries:
            pipe.xpending_range(self.keys.stream, GROUP, eid, eid, 1)
        counts = [rows[0]["times_delivered"] if rows else 1 for rows in pipe.execute()]
        return self._accept(consumer, entries, counts, reclaimed=True)

    def _read_new(self, consumer: str, count: int, block: int | None) -> list[Delivery]:
        reply = self._r.xreadgroup(GROUP, consumer, {self.keys.stream: ">"}, count=count, block=block)
        if isinstance(reply, dict):  # RESP3
            reply = list(reply.items())
        entries = [(_s(eid), fields) for _, rows in reply or [] for eid, fields in rows]
        return self._accept(consumer, entries, [1] * len(entries), reclaimed=False)

    def _decode_entry(self, fields: dict[Any, Any]) -> BatchMessage:
        names = sorted(_s(k) for k in fields)
        if names != [FIELD]:
            raise MessageError(f"stream entry has fields {names}, expected exactly [{FIELD!r}]")
        msg = BatchMessage.decode(next(iter(fields.values())))
        if msg.run_id != self.run_id:
            raise MessageError(f"message is for run {msg.run_id!r}, this queue serves {self.run_id!r}")
        return msg

    def _accept(
        self, consumer: str, entries: list[tuple[str, dict[Any, Any]]], counts: list[int], reclaimed: bool
    ) -> list[Delivery]:
        """Turn claimed entries into deliveries; dead-letter malformed ones, skip finished ones."""
        good: list[tuple[str, BatchMessage, int]] = []
        for (eid, fields), n in zip(entries, counts):
            try:
                good.append((eid, self._decode_entry(fields), n))
            except MessageError as e:
                self._dead_letter_malformed(eid, fields, str(e), consumer)
        if not good:
            return []
        ids = [m.batch_id for _, m, _ in good]
        if reclaimed:  # tries counted below, for the live ones only
            done, tries = self._r.hmget(self.keys.done, ids), [0] * len(ids)
        else:  # new work: its done records and try counts in one round trip
            pipe = self._r.pipeline(transaction=False)
            pipe.hmget(self.keys.done, ids)
            pipe.hmget(self.keys.attempts, ids)
            done, tries = pipe.execute()
        live = []
        for (eid, m, n), is_done, tried in zip(good, done, tries):
            if is_done is None:
                live.append((eid, m, n, int(tried or 0)))
            else:  # finished meanwhile, e.g. by a slow consumer after a reclaim: just drop the entry
                self._finish_entry(eid)
        if not live:
            return []
        if reclaimed:  # the previous holder abandoned it: that try counts
            pipe = self._r.pipeline(transaction=False)
            for _, m, _, _ in live:
                pipe.hincrby(self.keys.attempts, m.batch_id, 1)
            live = [(eid, m, n, int(a)) for (eid, m, n, _), a in zip(live, pipe.execute())]
        out = []
        for eid, m, n, attempt in live:
            d = Delivery(eid, replace(m, attempt=attempt), n, consumer)
            if reclaimed and attempt >= self.options.max_attempts:
                # A batch that kills or hangs every worker that takes it must not circulate forever.
                self._dead_letter(
                    d,
                    f"abandoned {attempt} times: not acked within idle_ms={self.options.idle_ms} (worker died or hung)",
                    consumer,
                )
            else:
                out.append(d)
        return out

    def ack(self, delivery: Delivery, worker: str) -> bool:
        """Mark the batch done and drop its entry. Idempotent: returns False if it was already done."""
        _check_consumer(worker)
        first = self._finish(
            keys=self._finish_keys(),
            args=[GROUP, delivery.entry_id, delivery.batch_id, _done_record("ok", worker), "done_ok", ""],
        )
        return bool(first)

    def ack_many(self, deliveries: Sequence[Delivery], worker: str) -> list[bool]:
        """`ack` of several deliveries in one round trip (a pipeline); each returns as `ack` would."""
        _check_consumer(worker)
        if not deliveries:
            return []
        p = Pipelined(self._r)
        for d in deliveries:
            p.script(
                self._finish,
                self._finish_keys(),
                [GROUP, d.entry_id, d.batch_id, _done_record("ok", worker), "done_ok", ""],
            )
        return [bool(first) for first in p.execute()]

    def fail(self, delivery: Delivery, reason: str) -> FailOutcome:
        """Count a failed try; retry after a backoff, or dead-letter at max_attempts."""
        if not isinstance(reason, str) or not reason.strip():
            raise QueueError(f"fail() needs a non-empty reason, got {reason!r}")
        tries = delivery.attempt + 1
        retry = replace(delivery.message, attempt=tries)
        n = int(
            self._fail(
                keys=[self.keys.stream, self.keys.attempts, self.keys.done, self.keys.retry],
                args=[
                    GROUP,
                    delivery.entry_id,
                    delivery.consumer,
                    delivery.batch_id,
                    self.options.max_attempts,
                    self.options.delay_s(tries),
                    retry.encode(),
                ],
            )
        )
        if n == -1:
            log.warning(
                "run %s batch %s: fail() by %s ignored, the entry was reclaimed or finished",
                self.run_id,
                delivery.batch_id,
                delivery.consumer,
            )
            return FailOutcome.STALE
        if n == -2:
            return FailOutcome.DONE
        if n >= self.options.max_attempts:
            self._dead_letter(
                replace(delivery, message=replace(delivery.message, attempt=n)), reason, delivery.consumer
            )
            return FailOutcome.DEAD
        log.warning(
            "run %s batch %s: try %d failed, retry in %.1fs: %s",
            self.run_id,
            delivery.batch_id,
            n,
            self.options.delay_s(tries),
            reason[:MAX_REASON_CHARS],
        )
        return FailOutcome.RETRY

    def touch(self, deliveries: Iterable[Delivery]) -> int:
        """Heartbeat: reset the idle time of entries still held by their consumer; returns how many.

        While a worker keeps touching its deliveries, `claim` never reclaims them, however long the
        batch takes. An entry that was reclaimed by another consumer is not taken back.
        """
        by_consumer: dict[str, list[str]] = {}
        for d in deliveries:
            by_consumer.setdefault(d.consumer, []).append(d.entry_id)
        return sum(int(self._touch(keys=[self.keys.stream], args=[GROUP, c, *ids])) for c, ids in by_consumer.items())

    def release(self, consumer: str) -> int:
        """Give back everything `consumer` holds as new work (no try counted) and forget the consumer.

        For a clean shutdown (SIGINT/SIGTERM): the batches go to the next claim at once instead of
        waiting out idle_ms. Returns how many entries were given back.
        """
        _check_consumer(consumer)
        try:
            held = self._r.xpending_range(self.keys.stream, GROUP, "-", "+", 10_000, consumername=consumer)
        except ResponseError as e:
            if "NOGROUP" in str(e):
                return 0
            raise
        n = 0
        ids = [_s(row["message_id"]) for row in held]
        for start in range(0, len(ids), 500):
            n += int(self._release(keys=[self.keys.stream], args=[GROUP, consumer, *ids[start : start + 500]]))
        self._r.xgroup_delconsumer(self.keys.stream, GROUP, consumer)  # holds nothing now
        if n:
            log.info("run %s: %s gave back %d batch(es)", self.run_id, consumer, n)
        return n

    def consumers(self) -> list[dict[str, Any]]:
        """The group's consumers: name, pending (entries held), idle_ms (since it last talked to Redis)."""
        try:
            rows = self._r.xinfo_consumers(self.keys.stream, GROUP)
        except ResponseError as e:
            if "NOGROUP" in str(e) or "no such key" in str(e):
                return []
            raise
        return [{"name": _s(r["name"]), "pending": int(r["pending"]), "idle_ms": int(r["idle"])} for r in rows]

    def release_all(self, keep: Iterable[str] = ()) -> int:
        """`release` every consumer except those in `keep`; returns how many entries were given back.

        A scheduler starting (or resuming) a run calls it before starting workers: consumers from an
        earlier start of the run no longer exist (their processes ended with that scheduler), so
        their batches are handed out at once instead of after idle_ms.
        """
        keep = set(keep)
        return sum(self.release(c["name"]) for c in self.consumers() if c["name"] not in keep)

    # ---- finishing ---------------------------------------------------------------------------

    def _finish_keys(self) -> list[str]:
        return [self.keys.stream, self.keys.done, self.keys.meta, self.keys.dead]

    def _finish_entry(
        self, entry_id: str, batch_id: str = "", record: str = "", counter: str = "", dead_letter: bytes | str = ""
    ) -> int:
        return int(
            self._finish(keys=self._finish_keys(), args=[GROUP, entry_id, batch_id, record, counter, dead_letter])
        )

    def _dead_letter(self, delivery: Delivery, reason: str, worker: str) -> None:
        letter = DeadLetter(
            self.run_id, delivery.batch_id, delivery.message.keys, delivery.attempt, reason[:MAX_REASON_CHARS]
        )
        log.warning(
            "run %s batch %s dead-lettered after %d tries: %s",
            self.run_id,
            delivery.batch_id,
            delivery.attempt,
            letter.reason,
        )
        self._finish_entry(delivery.entry_id, delivery.batch_id, _done_record("dead", worker), "dead", letter.encode())

    def _dead_letter_malformed(self, entry_id: str, fields: dict[Any, Any], error: str, worker: str) -> None:
        raw = {_s(k): v[:200] for k, v in fields.items()}
        # The batch id is unknown, so the letter is named after the entry; it counts in no total.
        letter = DeadLetter(
            self.run_id,
            "entry-" + entry_id,
            (),
            0,
            f"malformed stream entry {entry_id}: {error}; raw: {raw!r}"[:MAX_REASON_CHARS],
        )
        log.warning("run %s: %s", self.run_id, letter.reason)
        self._finish_entry(entry_id, dead_letter=letter.encode())

    # ---- observing and cleanup ---------------------------------------------------------------

    def progress(self) -> Progress:
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(self.keys.meta, ["total", "done_ok", "dead"])
        pipe.xpending(self.keys.stream, GROUP)
        (total, ok, dead), pending = pipe.execute(raise_on_error=False)
        total, ok, dead = (int(v or 0) for v in (total, ok, dead))
        in_flight = 0 if isinstance(pending, ResponseError) else int(pending["pending"])  # NOGROUP
        return Progress(total, ok, dead, max(0, total - ok - dead - in_flight), in_flight)

    def is_finished(self) -> bool:
        """True once every enqueued batch is done or dead (False before anything was enqueued)."""
        total, ok, dead = self._r.hmget(self.keys.meta, ["total", "done_ok", "dead"])
        return total is not None and int(ok or 0) + int(dead or 0) >= int(total)

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        rows = self._r.xrange(self.keys.dead, count=limit)
        return [DeadLetter.decode(next(iter(fields.values()))) for _, fields in rows]

    def delete(self) -> int:
        """Delete every key of the run; returns how many keys existed."""
        self._group_ready = False
        self._reclaim_cursor = "0-0"
        return int(self._r.delete(*self.keys.all()))
