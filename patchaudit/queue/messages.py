"""Queue messages: small, versioned JSON documents carrying ids and object keys, never pixels.

A message is a frozen dataclass with `encode() -> bytes` (JSON, sorted keys, compact) and
`decode(data)`. Decoding is strict: bad JSON, duplicate/missing/extra fields, wrong types, an unknown
schema version, an empty key list or a message over 1 MiB all raise `MessageError`, the only error
this module raises. Nothing here touches Redis, so a worker can check a payload without a server.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from patchaudit.errors import PatchauditError

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB: a batch is a list of keys; anything bigger is a bug upstream
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # run ids and batch ids, e.g. "b000042"


class MessageError(PatchauditError):
    """A queue message is malformed (the message says which field and what is allowed)."""


def check_id(what: str, value: object) -> str:
    """Return `value` if it is a valid run/batch id, else raise `MessageError`."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise MessageError(f"{what} must be 1-64 characters of [A-Za-z0-9_-], got {value!r}")
    return value


def _check_int(what: str, value: object, minimum: int = 0) -> None:
    # bool is an int subclass: JSON `true` must not pass as attempt 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MessageError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _check_keys(value: object, allow_empty: bool) -> tuple[str, ...]:
    # A bare string is iterable too; "abc" must not become ("a", "b", "c").
    if not isinstance(value, (list, tuple)):
        raise MessageError(f"keys must be a list of object keys, got {type(value).__name__}")
    if not value and not allow_empty:
        raise MessageError("keys must not be empty: a batch holds at least one object key")
    for i, key in enumerate(value):
        if not isinstance(key, str) or not key:
            raise MessageError(f"keys[{i}] must be a non-empty string, got {key!r}")
    return tuple(value)


def _check_version(kind: str, version: object) -> None:
    if type(version) is not int or version != SCHEMA_VERSION:  # rejects True and 1.0 too
        raise MessageError(
            f"unsupported {kind} schema version {version!r}; this build reads version {SCHEMA_VERSION}"
        )


def _no_duplicate_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise MessageError(f"field {name!r} appears twice")
        out[name] = value
    return out


class _Message:
    """Shared encode/decode for the message dataclasses (each subclass validates in `_check`)."""

    kind: ClassVar[str]

    def _check(self) -> None:
        raise NotImplementedError

    def __post_init__(self) -> None:
        _check_version(self.kind, self.version)  # type: ignore[attr-defined]
        self._check()

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return {name: list(v) if isinstance(v, tuple) else v for name, v in out.items()}

    def encode(self) -> bytes:
        data = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageError(
                f"{self.kind} encodes to {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit;"
                " cut smaller batches"
            )
        return data

    @classmethod
    def decode(cls, data: bytes | str) -> Any:
        """Parse and validate one encoded message; raise `MessageError` on any problem."""
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MessageError(f"{cls.kind} payload must be bytes or str, got {type(data).__name__}")
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageError(
                f"{cls.kind} payload is {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit"
            )
        try:
            obj = json.loads(bytes(data), object_pairs_hook=_no_duplicate_fields)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise MessageError(f"{cls.kind} payload is not valid UTF-8 JSON: {e}") from None
        if not isinstance(obj, dict):
            raise MessageError(f"{cls.kind} payload must be a JSON object, got {type(obj).__name__}")
        # Check the version first: a newer producer may have added fields this build does not know.
        if "version" not in obj:
            raise MessageError(f"{cls.kind} payload has no 'version' field")
        _check_version(cls.kind, obj["version"])
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        missing, extra = names - obj.keys(), obj.keys() - names
        if missing or extra:
            raise MessageError(
                f"{cls.kind} fields do not match schema v{SCHEMA_VERSION}:"
                f" missing {sorted(missing)}, unexpected {sorted(extra)}; expected {sorted(names)}"
            )
        return cls(**obj)


@dataclass(frozen=True)
class BatchMessage(_Message):
    """One unit of work: score these object keys of this run."""

    run_id: str
    batch_id: str
    keys: tuple[str, ...]  # object keys (or URIs) of the images, in report order
    attempt: int = 0  # failed or abandoned tries so far; the queue's counter is authoritative
    version: int = SCHEMA_VERSION

    kind: ClassVar[str] = "batch message"

    def _check(self) -> None:
        check_id("run_id", self.run_id)
        check_id("batch_id", self.batch_id)
        object.__setattr__(self, "keys", _check_keys(self.keys, allow_empty=False))
        _check_int("attempt", self.attempt)


@dataclass(frozen=True)
class DeadLetter(_Message):
    """A batch the queue gave up on, with the reason. `keys` is empty for an undecodable entry."""

    run_id: str
    batch_id: str
    keys: tuple[str, ...]
    attempts: int
    reason: str
    version: int = SCHEMA_VERSION

    kind: ClassVar[str] = "dead letter"

    def _check(self) -> None:
        check_id("run_id", self.run_id)
        check_id("batch_id", self.batch_id)
        object.__setattr__(self, "keys", _check_keys(self.keys, allow_empty=True))
        _check_int("attempts", self.attempts)
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise MessageError(f"reason must be a non-empty string, got {self.reason!r}")
