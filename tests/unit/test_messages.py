"""Queue messages: round trips and every kind of malformed input (no services needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from patchaudit.errors import PatchauditError
from patchaudit.queue.messages import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    BatchMessage,
    DeadLetter,
    MessageError,
)

GOOD = {"run_id": "r1", "batch_id": "b000042", "keys": ["a/1.png", "a/2.png"], "attempt": 0, "version": SCHEMA_VERSION}


def raw(**changes: object) -> bytes:
    doc = {**GOOD, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_batch_round_trip_and_canonical_encoding() -> None:
    m = BatchMessage("r1", "b000042", ("a/1.png", "a/2.png"), attempt=2)
    data = m.encode()
    assert BatchMessage.decode(data) == m
    assert BatchMessage.decode(data.decode()) == m  # str accepted too
    assert data == b'{"attempt":2,"batch_id":"b000042","keys":["a/1.png","a/2.png"],"run_id":"r1","version":1}'


def test_keys_list_becomes_tuple_and_message_is_hashable() -> None:
    m = BatchMessage("r1", "b1", ["k"])  # type: ignore[arg-type]
    assert m.keys == ("k",)
    assert hash(m) == hash(BatchMessage("r1", "b1", ("k",)))


def test_dead_letter_round_trip_allows_empty_keys() -> None:
    d = DeadLetter("r1", "entry-17-0", (), 0, "not JSON")
    assert DeadLetter.decode(d.encode()) == d
    d2 = DeadLetter("r1", "b7", ("x.png",), 3, "CUDA out of memory")
    assert DeadLetter.decode(d2.encode()) == d2


def test_error_is_a_patchaudit_error() -> None:
    assert issubclass(MessageError, PatchauditError)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (raw(version=...), "no 'version'"),
        (raw(version=2), "unsupported batch message schema version 2"),
        (raw(version="1"), "schema version '1'"),
        (raw(version=True), "schema version True"),
        (raw(version=1.0), "schema version 1.0"),
        (raw(keys=...), r"missing \['keys'\]"),
        (raw(extra="x"), r"unexpected \['extra'\]"),
        (raw(keys=[]), "keys must not be empty"),
        (raw(keys="a/1.png"), "keys must be a list"),
        (raw(keys=["ok", ""]), r"keys\[1\] must be a non-empty string"),
        (raw(keys=["ok", 3]), r"keys\[1\] must be a non-empty string"),
        (raw(attempt=-1), "attempt must be an integer >= 0"),
        (raw(attempt=1.5), "attempt must be an integer"),
        (raw(attempt=True), "attempt must be an integer"),
        (raw(attempt=None), "attempt must be an integer"),
        (raw(batch_id=""), "batch_id must be 1-64 characters"),
        (raw(batch_id="b 1"), "batch_id must be"),
        (raw(batch_id="b" * 65), "batch_id must be"),
        (raw(batch_id=42), "batch_id must be"),
        (raw(run_id="../etc"), "run_id must be"),
        (
            b'{"run_id":"r1","run_id":"r2","batch_id":"b1","keys":["k"],"attempt":0,"version":1}',
            "'run_id' appears twice",
        ),
        (None, "must be bytes or str"),
    ],
)
def test_malformed_batch_message_is_rejected(data: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        BatchMessage.decode(data)


def test_oversized_payload_is_rejected_before_parsing() -> None:
    with pytest.raises(MessageError, match="over the 1048576-byte limit"):
        BatchMessage.decode(b" " * (MAX_MESSAGE_BYTES + 1))


def test_oversized_message_cannot_be_encoded() -> None:
    keys = tuple(f"k{i:07d}" * 8 for i in range(20_000))  # ~1.3 MB of keys
    with pytest.raises(MessageError, match="cut smaller batches"):
        BatchMessage("r1", "b1", keys).encode()


def test_invalid_message_cannot_be_constructed() -> None:
    with pytest.raises(MessageError, match="keys must not be empty"):
        BatchMessage("r1", "b1", ())
    with pytest.raises(MessageError, match="schema version 2"):
        BatchMessage("r1", "b1", ("k",), version=2)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"reason": ""}, "reason must be a non-empty string"),
        ({"reason": None}, "reason must be"),
        ({"attempts": -1}, "attempts must be an integer >= 0"),
        ({"attempt": 1}, r"missing \['attempts'\], unexpected \['attempt'\]"),
    ],
)
def test_malformed_dead_letter_is_rejected(changes: dict[str, object], match: str) -> None:
    doc = {"run_id": "r1", "batch_id": "b1", "keys": [], "attempts": 3, "reason": "x", "version": 1, **changes}
    if "attempt" in changes:
        del doc["attempts"]
    with pytest.raises(MessageError, match=match):
        DeadLetter.decode(json.dumps(doc))


def test_scheduler_modules_stay_light() -> None:
    # messages/local_redis import neither torch nor redis; streams imports redis but not torch.
    code = (
        "import sys, patchaudit.queue.messages, patchaudit.scheduler.local_redis;"
        "bad = [m for m in ('torch', 'redis') if m in sys.modules];"
        "import patchaudit.queue.streams;"
        "bad += ['torch'] if 'torch' in sys.modules else [];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
