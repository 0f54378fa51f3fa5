"""A Redis for the embedded default: use the configured one, or start a private throwaway server.

`ensure_redis(url)` returns a `RedisHandle`. If `url` (default: env REDIS_URL, else
redis://127.0.0.1:6379) answers PING, the handle just carries it. Otherwise, for a loopback URL, a
private `redis-server` from PATH is started on a free loopback port with persistence off and its
files in a temporary directory; `close()` (or leaving the `with` block) stops it and removes them.
A non-loopback URL that does not answer is an error, not a fallback: workers on other machines
could not reach a private server, so a run would silently go nowhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from urllib.parse import urlsplit

from patchaudit.errors import RedisUnavailable
from patchaudit.queue.redact import DEFAULT_URL, redact_url

__all__ = ["DEFAULT_URL", "RedisHandle", "RedisUnavailable", "ensure_redis"]
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_INSTALL_HINT = "install one (apt-get install redis-server) or set REDIS_URL to a running Redis"


def _answers(url: str, timeout_s: float = 0.5) -> bool:
    """True if `url` answers PING; False if nothing listens. Auth or protocol trouble raises.

    Something that accepts the connection and then closes it or answers garbage is not "nothing
    listens": starting a private Redis in its place would hide a wrong port, so that is an error.
    """
    import redis  # lazy: importing the scheduler package must stay cheap

    from patchaudit.queue.connection import describe_redis_error

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (
        redis.AuthenticationError,
        redis.exceptions.AuthorizationError,
        redis.ResponseError,
        redis.exceptions.InvalidResponse,
    ) as e:  # something answers, but not for us
        raise RedisUnavailable(describe_redis_error(e, url)) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        if _refused(e):
            return False
        raise RedisUnavailable(describe_redis_error(e, url)) from None
    finally:
        client.close()


def _refused(exc: BaseException) -> bool:
    """True when nothing listens (connection refused / host unreachable), not when a peer misbehaved."""
    text = str(exc)
    return not ("closed by server" in text or "Protocol Error" in text or "reset by peer" in text)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen[bytes] | None, tempdir: str | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    if tempdir is not None:
        shutil.rmtree(tempdir, ignore_errors=True)


class RedisHandle:
    """A usable Redis URL; owns the server process when it started a private one."""

    def __init__(self, url: str, process: subprocess.Popen[bytes] | None = None, tempdir: str | None = None):
        self.url = url
        self._process = process
        # Stops the server even if close() is never called (garbage collection or interpreter exit).
        self._finalizer = weakref.finalize(self, _stop, process, tempdir)

    @property
    def private(self) -> bool:
        """True if this handle started (and will stop) its own redis-server."""
        return self._process is not None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def close(self) -> None:
        """Stop the private server, if any, and remove its directory. Idempotent."""
        self._finalizer()

    def __enter__(self) -> RedisHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisHandle(url={self.url!r}, private={self.private})"


def ensure_redis(url: str | None = None, *, start_timeout_s: float = 10.0, server: str = "redis-server") -> RedisHandle:
    """Return a handle to a Redis that answers PING, starting a private one if needed."""
    url = url or os.environ.get("REDIS_URL") or DEFAULT_URL
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise RedisUnavailable(f"REDIS URL must start with redis://, rediss:// or unix://, got {redact_url(url)!r}")
    if _answers(url):
        return RedisHandle(url)
    if parts.scheme == "unix" or parts.hostname not in _LOOPBACK:
        raise RedisUnavailable(
            f"no Redis answers at {redact_url(url)}; a private server is only started in place of a loopback "
            "URL (127.0.0.1/localhost), so check the address or start that Redis"
        )
    binary = shutil.which(server)
    if binary is None:
        raise RedisUnavailable(f"no Redis answers at {redact_url(url)} and {server!r} is not on PATH; {_INSTALL_HINT}")
    return _start_private(binary, start_timeout_s)


def _start_private(binary: str, timeout_s: float) -> RedisHandle:
    errors = []
    for _ in range(3):  # the free port can be taken between probing it and the server binding it
        port = _free_port()
        tempdir = tempfile.mkdtemp(prefix="patchaudit-redis-")
        log_path = Path(tempdir) / "redis.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    tempdir,
                    "--daemonize",
                    "no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(url, timeout_s=0.2):
                return RedisHandle(url, process, tempdir)
            time.sleep(0.05)
        hung = process.poll() is None
        tail = log_path.read_text(errors="replace")[-500:].strip()
        _stop(process, tempdir)
        if hung:
            errors.append(f"port {port}: no answer within {timeout_s:g}s: {tail}")
        else:
            errors.append(f"port {port}: exited with code {process.returncode}: {tail}")
    raise RedisUnavailable(f"could not start a private {binary}: " + "; ".join(errors))
