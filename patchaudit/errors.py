"""The exception hierarchy shared by every patchaudit package.

Every package of ours imports it and it imports none of them, so one hierarchy serves all.
The CLI turns any `PatchauditError` into one clear line instead of a traceback.
"""

from __future__ import annotations


class PatchauditError(Exception):
    """Base class: a problem the user can act on (bad input, bad config, missing data)."""


class ConfigError(PatchauditError):
    """A config file or value is invalid; the message says what is allowed."""


class StoreError(PatchauditError):
    """Object storage failed: missing object, bad URI, permission, exhausted retries."""


class ObjectNotFound(StoreError):
    """The object (or prefix) does not exist."""


class ArtifactError(PatchauditError):
    """A model artifact is missing, corrupt or does not match its manifest."""


class RedisUnavailable(PatchauditError):
    """Redis cannot be used: unreachable, wrong credentials, not a Redis, or lost beyond the retries."""


class RayUnavailable(PatchauditError):
    """The Ray cluster named by RAY_ADDRESS refused the driver (token authentication) or cannot be reached."""


class MiningError(PatchauditError):
    """A mining or comparison command got input it cannot use (missing report, invalid predicate, ...)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs (actors stopped, batches given back)."""


_terminated: list[bool] = []  # set by raise_terminated: libraries may re-raise a plain KeyboardInterrupt


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: raise `Terminated` in the main thread (install with signal.signal)."""
    _terminated.append(True)
    raise Terminated()


def was_terminated(exc: BaseException) -> bool:
    """True if `exc` (a KeyboardInterrupt) came from SIGTERM rather than Ctrl-C / SIGINT."""
    return isinstance(exc, Terminated) or bool(_terminated)
