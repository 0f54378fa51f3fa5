"""Lua script calls and plain commands sent to Redis in one round trip.

redis-py's pipeline asks Redis whether its scripts are loaded (SCRIPT EXISTS) before every pipeline
that holds a script call: a second round trip each time, on the queue's hottest paths (a claim, the
acks of a worker's parts). Here a script call is queued as a plain EVALSHA instead. A script Redis
does not know (it restarted, or its scripts were flushed) fails alone with NOSCRIPT, which ran
nothing; that one call is then run again on its own by the `Script` object, which loads the script
first. So every call runs exactly once, in the pipeline or right after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.commands.core import Script
from redis.exceptions import NoScriptError


class Pipelined:
    """A non-transactional pipeline of script calls (`script`) and plain commands (`pipe.<command>`)."""

    def __init__(self, client: Any) -> None:
        self.pipe = client.pipeline(transaction=False)
        self._scripts: list[tuple[int, Script, Sequence[Any], Sequence[Any]]] = []

    def script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Queue `script(keys=keys, args=args)`."""
        self._scripts.append((len(self.pipe), script, keys, args))
        self.pipe.evalsha(script.sha, len(keys), *keys, *args)

    def execute(self) -> list[Any]:
        """The replies in the order queued; the first error reply is raised (as `execute()` would)."""
        replies = self.pipe.execute(raise_on_error=False)
        for i, script, keys, args in self._scripts:
            if isinstance(replies[i], NoScriptError):  # not loaded: it ran nothing; run it on its own
                replies[i] = script(keys=keys, args=args)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies
