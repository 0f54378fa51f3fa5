"""Redis connections for the scheduler and the workers: bounded reconnects and redacted messages.

`connect(url)` gives a client that retries a command on a transient connection loss (a Redis
restart, a dropped socket) with exponential backoff, a bounded number of times, then raises. Every
message that names a Redis passes its URL through `redact_url` first: a password in a URL
(`redis://:secret@host/0`, `redis://user:secret@host`, `?password=secret`) is printed as `***`.
`describe_redis_error` turns any redis-py error into one line that says what to check, so the CLI
prints it instead of a traceback.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from patchaudit.errors import RedisUnavailable
from patchaudit.queue.redact import DEFAULT_URL, _password, redact_text, redact_url

__all__ = ["DEFAULT_URL", "connect", "describe_redis_error", "redact_text", "redact_url", "unavailable"]

RETRIES = 6  # reconnect tries per command on a lost connection
BACKOFF_BASE_S = 0.25  # first wait; doubles per try
BACKOFF_CAP_S = 8.0  # longest single wait: the tries span at most ~24 s in all


def describe_redis_error(exc: BaseException, url: str, doing: str = "") -> str:
    """One line naming the (redacted) Redis, what failed and what to check; no secrets, no traceback."""
    where = redact_url(url)
    what = redact_text(str(exc) or type(exc).__name__, tuple(filter(None, [_password(url)])))
    ctx = f" while {doing}" if doing else ""
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in what or "WRONGPASS" in what:
        if "HELLO must be called" in what or "NOAUTH" in what or _password(url) is None:
            return (
                f"Redis at {where} requires a password{ctx} and the URL gives none; "
                "put it in the URL (redis://:PASSWORD@host:port/0) or in REDIS_URL"
            )
        return f"Redis at {where} refused the credentials{ctx} ({what}); check the password in the URL"
    if isinstance(exc, redis.ResponseError):
        return f"Redis at {where} answered with an error{ctx}: {what}"
    if isinstance(exc, redis.TimeoutError):
        return f"Redis at {where} did not answer in time{ctx} ({what}); is it overloaded or unreachable?"
    if "Protocol Error" in what or "closed by server" in what or isinstance(exc, redis.exceptions.InvalidResponse):
        return (
            f"the service at {where} does not speak the Redis protocol{ctx} ({what}); "
            "is another program listening on that port?"
        )
    if isinstance(exc, (redis.ConnectionError, OSError)):
        return (
            f"cannot reach Redis at {where}{ctx} ({what}); retried with backoff; "
            "check that it runs and the address, or set REDIS_URL / run.redis_url"
        )
    return f"Redis at {where} failed{ctx}: {type(exc).__name__}: {what}"


def unavailable(exc: BaseException, url: str, doing: str = "") -> RedisUnavailable:
    """A RedisUnavailable carrying `describe_redis_error`'s line (raise it `from None`)."""
    return RedisUnavailable(describe_redis_error(exc, url, doing))


class _TransientRetry(Retry):
    """redis-py's Retry that gives up at once on authentication errors.

    AuthenticationError subclasses ConnectionError, but a wrong password does not heal by waiting.
    """

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(exc: Exception) -> bool:
            if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
                return False
            return is_retryable is None or bool(is_retryable(exc))

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def connect(url: str, *, socket_timeout: float | None = 30.0, retries: int = RETRIES, **kwargs: Any) -> Any:
    """A redis.Redis for `url` that reconnects with bounded exponential backoff on connection loss.

    A command that meets a dropped connection or a timeout is retried up to `retries` times
    (waits 0.25 s, 0.5 s, ... capped at 8 s), then the error is raised; authentication errors
    are not retried. `socket_timeout` must exceed any blocking read (claim's block_ms).
    """
    retry = _TransientRetry(
        ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S),
        retries,
        supported_errors=(redis.ConnectionError, redis.TimeoutError, ConnectionResetError),
    )
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout or 10, 10),
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **kwargs,
    )
