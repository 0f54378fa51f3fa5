"""ensure_redis: reuse a Redis that answers, else start (and stop) a private redis-server.

Only loopback is ever contacted. Tests that need `redis-server` on PATH or the Redis at
127.0.0.1:6379 skip without them, unless CI=true (then they fail).
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

redis = pytest.importorskip("redis")

from patchaudit.scheduler import local_redis  # noqa: E402
from patchaudit.scheduler.local_redis import RedisUnavailable, ensure_redis  # noqa: E402

pytestmark = pytest.mark.integration
SHARED_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def need(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    c = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(c.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    finally:
        c.close()


def test_reuses_a_redis_that_answers() -> None:
    need(answers(SHARED_URL), f"no Redis answers at {SHARED_URL}")
    with ensure_redis(SHARED_URL) as h:
        assert h.url == SHARED_URL and not h.private and h.pid is None
    assert answers(SHARED_URL)  # closing a borrowed handle leaves the server alone


def test_starts_a_private_server_when_nothing_answers_and_stops_it_on_close() -> None:
    need(shutil.which("redis-server") is not None, "redis-server is not on PATH")
    dead_url = f"redis://127.0.0.1:{free_port()}"
    assert not answers(dead_url)
    h = ensure_redis(dead_url)
    try:
        assert h.private and h.url != dead_url and h.url.startswith("redis://127.0.0.1:")
        c = redis.Redis.from_url(h.url)
        c.set("k", "v")
        assert c.get("k") == b"v"
        assert c.config_get("save")["save"] == "" and c.config_get("appendonly")["appendonly"] == "no"
        assert c.config_get("bind")["bind"] == "127.0.0.1"
        c.close()
    finally:
        h.close()
    assert not answers(h.url)
    with pytest.raises(ProcessLookupError):
        os.kill(h.pid, 0)  # reaped, not a zombie
    h.close()  # idempotent


def test_env_redis_url_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1234/2")
    monkeypatch.setattr(local_redis, "_answers", lambda url, timeout_s=0.5: seen.append(url) or True)
    assert ensure_redis().url == "redis://127.0.0.1:1234/2"
    monkeypatch.delenv("REDIS_URL")
    assert ensure_redis().url == local_redis.DEFAULT_URL
    assert seen == ["redis://127.0.0.1:1234/2", local_redis.DEFAULT_URL]


def test_missing_server_binary_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}"
    with pytest.raises(RedisUnavailable, match=r"apt-get install redis-server.*REDIS_URL"):
        ensure_redis(dead_url, server="no-such-redis-server-binary")


def test_non_loopback_url_that_does_not_answer_is_not_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    # _answers is stubbed so that no packet leaves the machine.
    monkeypatch.setattr(local_redis, "_answers", lambda url, timeout_s=0.5: False)
    with pytest.raises(RedisUnavailable, match="only started in place of a loopback URL"):
        ensure_redis("redis://redis.example.internal:6379")


def test_bad_scheme_is_rejected() -> None:
    with pytest.raises(RedisUnavailable, match="must start with redis://"):
        ensure_redis("http://127.0.0.1:6379")


def test_server_that_exits_at_once_is_reported() -> None:
    need(shutil.which("false") is not None, "no `false` binary on PATH")
    dead_url = f"redis://127.0.0.1:{free_port()}"
    with pytest.raises(RedisUnavailable, match="exited with code 1"):
        ensure_redis(dead_url, server="false")
