"""Queue messages: small, versioned JSON documents carrying ids and object keys, never pixels.

A message is a frozen schema dataclass (patchaudit.schema: every field typed, with its meaning and
rules, checked when the message is made) with `encode() -> bytes` (JSON, sorted keys, compact) and
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
from patchaudit.schema import Schema, need, opt

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


def _check_version(kind: str, version: object) -> None:
    if type(version) is not int or version != SCHEMA_VERSION:  # rejects True and 1.0 too
        raise MessageError(f"unsupported {kind} schema version {version!r}; this build reads version {SCHEMA_VERSION}")


def _no_duplicate_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise MessageError(f"field {name!r} appears twice")
        out[name] = value
    return out


ID_NOUN = "1-64 characters of [A-Za-z0-9_-]"


class _Message(Schema):
    """Shared encode/decode for the message dataclasses; their fields are checked by the schema."""

    schema_error: ClassVar[type[PatchauditError]] = MessageError
    kind: ClassVar[str]

    def __post_init__(self) -> None:
        # The version first: a newer producer's message may not fit this build's fields at all.
        _check_version(self.kind, self.version)  # type: ignore[attr-defined]
        super().__post_init__()

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
            raise MessageError(f"{cls.kind} payload is {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
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

    run_id: str = need("the run", pattern=ID_PATTERN, noun=ID_NOUN)
    batch_id: str = need("the batch, unique within its run", pattern=ID_PATTERN, noun=ID_NOUN)
    keys: tuple[str, ...] = need("object keys (or URIs) of the images, in report order", min_len=1, nonempty=True)
    attempt: int = opt(0, "failed or abandoned tries so far; the queue's counter is authoritative", ge=0)
    version: int = opt(SCHEMA_VERSION, "message schema version")

    kind: ClassVar[str] = "batch message"


@dataclass(frozen=True)
class DeadLetter(_Message):
    """A batch the queue gave up on, with the reason. `keys` is empty for an undecodable entry."""

    run_id: str = need("the run", pattern=ID_PATTERN, noun=ID_NOUN)
    batch_id: str = need("the batch", pattern=ID_PATTERN, noun=ID_NOUN)
    keys: tuple[str, ...] = need("object keys of the batch's images (empty if its entry was unreadable)", nonempty=True)
    attempts: int = need("tries made", ge=0)
    reason: str = need("why the queue gave up", nonempty=True)
    version: int = opt(SCHEMA_VERSION, "message schema version")

    kind: ClassVar[str] = "dead letter"
