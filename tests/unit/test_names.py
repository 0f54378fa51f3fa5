"""File names as keys: percent-encoding where a key cannot hold a name, reversible; listing skip reasons."""

from __future__ import annotations

import os

import pytest

from patchaudit.errors import StoreError
from patchaudit.store import names
from patchaudit.store.objects import open_store

ODD = [b"plain.png", b"caf\xc3\xa9.png", b"scan\xff1.png", b"a\\b.png", b"50%.png", b"%41.png", b"\xe9t\xe9.png"]


@pytest.mark.parametrize("raw", ODD)
def test_encode_decode_round_trip(raw):
    name = os.fsdecode(raw)
    key = names.encode_name(name)
    assert "\\" not in key and "/" not in key
    key.encode("utf-8")  # a key is valid UTF-8
    assert names.decode_name(key) == name


def test_encoding_is_documented_form():
    assert names.encode_name(os.fsdecode(b"scan\xff\\1%.png")) == "scan%FF%5C1%25.png"
    assert names.encode_name("café.png") == "café.png"


@pytest.mark.parametrize("text", ["a%2Fb", "%00", "%2E%2E", "%2E"])
def test_decode_never_gives_a_separator_or_dot_names(text):
    with pytest.raises(StoreError, match="not a file name"):
        names.decode_name(text)


def test_file_store_addresses_every_name(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for raw in ODD:
        with open(os.path.join(os.fsencode(root), raw), "wb") as f:
            f.write(raw)
    store = open_store(str(root))
    infos = list(store.list())
    assert len(infos) == len(ODD)
    for info in infos:
        raw = os.fsencode(names.decode_name(info.key))
        assert store.read_bytes(info.key) == raw
        assert store.head(info.key).size == len(raw)
    assert {i.key for i in infos} >= {"scan%FF1.png", "a%5Cb.png", "50%25.png", "%2541.png"}


def test_listing_reports_what_it_leaves_out(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "x.png").write_bytes(b"x")
    (root / "a.png").write_bytes(b"a")
    (root / "notes.txt").write_text("n")
    os.symlink(outside / "x.png", root / "out.png")
    os.symlink(root / "missing.png", root / "dangling.png")
    os.symlink(root / "sub", root / "subdir-link")
    os.mkfifo(root / "pipe.png")
    skipped: list[tuple[str, str]] = []
    listed = [
        i.key for i in open_store(str(root)).list(extensions=(".png",), on_skip=lambda k, why: skipped.append((k, why)))
    ]
    assert listed == ["a.png"]
    assert sorted(skipped) == sorted(
        [
            ("notes.txt", names.SKIP_EXTENSION),
            ("out.png", names.SKIP_SYMLINK_OUTSIDE),
            ("dangling.png", names.SKIP_BROKEN_SYMLINK),
            ("subdir-link", names.SKIP_EXTENSION),
            ("pipe.png", names.SKIP_NOT_A_FILE),
        ]
    )
    skipped.clear()
    list(open_store(str(root)).list(on_skip=lambda k, why: skipped.append((k, why))))
    assert ("subdir-link", names.SKIP_SYMLINK_DIR) in skipped
