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


class MiningError(PatchauditError):
    """A mining or comparison command got input it cannot use (missing report, invalid predicate, ...)."""
