"""File names as object keys: every name a local filesystem allows is addressable.

A `file://` store's key is the path under its root with each name percent-encoded where a key
cannot hold it literally:

    a byte of the name that is not part of valid UTF-8   ->  %XX (its value, upper-case hex)
    a backslash (keys use '/' as the only separator)     ->  %5C
    a percent sign (so that decoding is unambiguous)     ->  %25

Every other character is kept as it is, so ordinary names ('0001.png', 'café.jpg') are their own
keys. The mapping is reversible: `decode_name(encode_name(n)) == n` for every name, and a key
decodes only to a single name (never to one containing '/' or NUL, nor to '.' or '..').
Example: the bytes b'scan\\xff\\\\1%.png' name the key 'scan%FF%5C1%25.png'.

Also here: the reasons a listing gives for an entry it does not list (`SKIP_*`), which a run
counts in its summary so that every file under the input is either a row or a counted skip.
"""

from __future__ import annotations

import os
import re

from patchaudit.errors import StoreError

_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")

# Why a listing left an entry out (the run summary counts them by these reasons).
SKIP_EXTENSION = "not an image (file extension)"
SKIP_SYMLINK_OUTSIDE = "symlink outside the input"  # a run lists it anyway: it gets an error row
SKIP_SYMLINK_DIR = "symlink to a directory (not followed)"
SKIP_BROKEN_SYMLINK = "broken symlink"
SKIP_NOT_A_FILE = "not a regular file"
SKIP_BAD_KEY = "name cannot be a key"


def encode_name(name: str) -> str:
    """One path component as the OS gave it (str, undecodable bytes as surrogate escapes) -> key text."""
    raw = os.fsencode(name)
    out = []
    for ch in raw.decode("utf-8", errors="surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not valid UTF-8
            out.append(f"%{code - 0xDC00:02X}")
        elif ch == "%":
            out.append("%25")
        elif ch == "\\":
            out.append("%5C")
        else:
            out.append(ch)
    return "".join(out)


def decode_name(text: str) -> str:
    """Key text of one path component -> the name to give the OS (the inverse of `encode_name`)."""
    if "%" not in text:
        return text
    raw = bytearray()
    pos = 0
    for m in _PERCENT.finditer(text):
        raw += text[pos : m.start()].encode("utf-8", errors="surrogateescape")
        raw.append(int(m.group(1), 16))
        pos = m.end()
    raw += text[pos:].encode("utf-8", errors="surrogateescape")
    if b"/" in raw or b"\x00" in raw or bytes(raw) in (b".", b".."):
        raise StoreError(f"key component {text!r} decodes to {bytes(raw)!r}, which is not a file name")
    return os.fsdecode(bytes(raw))


def encode_path(parts: list[str]) -> str:
    return "/".join(encode_name(p) for p in parts)


def decode_key(key: str) -> list[str]:
    """A (checked) key -> its path components as OS names."""
    return [decode_name(p) for p in key.split("/")]
