"""`patchaudit status RUN_ID`: progress of a run from Redis (no torch, no Ray)."""

from __future__ import annotations

import json
import os
from typing import Any

import redis

from patchaudit.errors import RedisUnavailable
from patchaudit.queue.connection import DEFAULT_URL, connect, redact_url, unavailable
from patchaudit.queue.streams import BatchQueue


def run_status(run_id: str, redis_url: str | None = None) -> dict:
    url = redis_url or os.environ.get("REDIS_URL") or DEFAULT_URL
    try:
        return _status(connect(url, socket_timeout=5, retries=2), run_id, url)
    except redis.RedisError as exc:
        raise unavailable(exc, url, "reading the run's progress") from None


def _status(client: Any, run_id: str, url: str) -> dict[str, Any]:
    client.ping()
    queue = BatchQueue(client, run_id)
    p = queue.progress()
    if p.total == 0 and not client.exists(queue.keys.meta):
        raise RedisUnavailable(f"no run {run_id!r} in Redis at {redact_url(url)} (finished runs expire after 7 days)")
    finished = queue.is_finished()
    # Runs record their state; one that has not queued its batches yet is still listing its input.
    state = queue.state() or ("finished" if finished else "running" if p.total else "starting")
    dead = queue.dead_letters(limit=20)
    error = client.hget(queue.keys.meta, "error")
    return {
        "run_id": run_id,
        "state": state,
        "batches": p.total,
        "done": p.done_ok,
        "dead_lettered": p.dead,
        "in_flight": p.in_flight,
        "pending": p.pending,
        "finished": finished,
        # Set when the scheduler stopped early (an error or an interrupt); a re-run with the run id resumes it.
        "error": error.decode() if isinstance(error, bytes) else error,
        "percent": round(100.0 * (p.done_ok + p.dead) / p.total, 1) if p.total else 0.0,
        "dead_letters": [{"batch_id": d.batch_id, "attempts": d.attempts, "reason": d.reason} for d in dead],
    }


def print_status(run_id: str, redis_url: str | None = None) -> int:
    print(json.dumps(run_status(run_id, redis_url), indent=2))
    return 0
