"""FileStore: round trips, listing, atomic writes, traversal guards, errors."""

from __future__ import annotations

import os
import pickle

import pytest

from patchaudit.errors import ObjectNotFound, StoreError
from patchaudit.store.objects import FileStore, ObjectInfo, open_store, resolve


@pytest.fixture
def store(tmp_path) -> FileStore:
    return FileStore(tmp_path / "store")


def _fill(store: FileStore) -> None:
    for key in ["b.png", "a.png", "a/x.PNG", "a/y.jpg", "a/sub/z.png", "a.txt", "ab/q.png", "c d/e.JPEG"]:
        store.write_bytes(key, key.encode())


def test_round_trip_and_head(store, tmp_path):
    info = store.write_bytes("dir/sub/img.png", b"\x89PNG data")
    assert info == store.head("dir/sub/img.png")
    assert info.key == "dir/sub/img.png"
    assert info.size == 9
    assert info.uri == f"file://{tmp_path}/store/dir/sub/img.png"
    assert store.read_bytes("dir/sub/img.png") == b"\x89PNG data"
    with store.open_read("dir/sub/img.png") as f:
        assert f.read(4) == b"\x89PNG"
        assert f.read() == b" data"
    assert (tmp_path / "store/dir/sub/img.png").read_bytes() == b"\x89PNG data"
    assert store.exists("dir/sub/img.png") and not store.exists("dir/sub/other.png")


def test_etag_changes_when_content_changes(store):
    a = store.write_bytes("k", b"one")
    b = store.write_bytes("k", b"three")
    assert a.etag != b.etag and b.size == 5
    assert store.head("k").etag == b.etag  # stable while unchanged


def test_write_file_and_delete(store, tmp_path):
    src = tmp_path / "local.bin"
    src.write_bytes(os.urandom(3 << 20))
    info = store.write_file("up/local.bin", src)
    assert info.size == 3 << 20
    assert store.read_bytes("up/local.bin") == src.read_bytes()
    store.delete("up/local.bin")
    assert not store.exists("up/local.bin")
    store.delete("up/local.bin")  # idempotent
    with pytest.raises(StoreError, match="local file"):
        store.write_file("x", tmp_path / "missing.bin")


def test_list_sorted_recursive(store):
    _fill(store)
    keys = [i.key for i in store.list()]
    # Sorted by key as strings (S3 order): "a.png" < "a.txt" < "a/..." since '.' < '/'.
    assert keys == sorted(keys)
    assert keys == [
        "a.png",
        "a.txt",
        "a/sub/z.png",
        "a/x.PNG",
        "a/y.jpg",
        "ab/q.png",
        "b.png",
        "c d/e.JPEG",
    ]
    assert all(isinstance(i, ObjectInfo) for i in store.list())


def test_list_prefix_is_a_string_prefix(store):
    _fill(store)
    assert [i.key for i in store.list("a/")] == ["a/sub/z.png", "a/x.PNG", "a/y.jpg"]
    assert [i.key for i in store.list("a")] == [
        "a.png",
        "a.txt",
        "a/sub/z.png",
        "a/x.PNG",
        "a/y.jpg",
        "ab/q.png",
    ]
    assert [i.key for i in store.list("a/s")] == ["a/sub/z.png"]
    assert list(store.list("nothing/here/")) == []


def test_list_extensions_case_insensitive(store):
    _fill(store)
    got = [i.key for i in store.list(extensions=(".png", ".JPEG"))]
    assert got == ["a.png", "a/sub/z.png", "a/x.PNG", "ab/q.png", "b.png", "c d/e.JPEG"]
    assert [i.key for i in store.list("a/", extensions=".jpg")] == ["a/y.jpg"]
    with pytest.raises(StoreError, match="'.png'"):
        store.list(extensions=["png"])


def test_list_missing_root_is_empty_and_file_root_is_an_error(tmp_path):
    assert list(FileStore(tmp_path / "nope").list()) == []  # like an empty S3 prefix
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        FileStore(tmp_path / "f").list()


def test_atomic_write_leaves_no_temp_files(store, tmp_path, monkeypatch):
    store.write_bytes("d/k.bin", b"old")
    store.write_bytes("d/k.bin", b"new")
    assert sorted(os.listdir(tmp_path / "store/d")) == ["k.bin"]

    # A failure mid-write keeps the old content and removes the temp file.
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(StoreError, match="disk full"):
        store.write_bytes("d/k.bin", b"partial")
    monkeypatch.undo()
    assert store.read_bytes("d/k.bin") == b"new"
    assert sorted(os.listdir(tmp_path / "store/d")) == ["k.bin"]


def test_list_skips_stray_temp_files(store, tmp_path):
    store.write_bytes("k.bin", b"x")
    (tmp_path / "store/.k.bin.0123456789ab.tmp").write_bytes(b"half")
    assert [i.key for i in store.list()] == ["k.bin"]


@pytest.mark.parametrize(
    "key, why",
    [
        ("../x", r"'\.\.'"),
        ("a/../../x", r"'\.\.'"),
        ("/etc/passwd", "absolute"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("", "empty"),
        ("a//b", "empty or '.'"),
        ("./a", "empty or '.'"),
        ("a/", "empty or '.'"),
    ],
)
def test_bad_keys_rejected(store, key, why):
    ops = [store.head, store.read_bytes, store.delete, lambda k: store.write_bytes(k, b"x")]
    if key != "a/":  # child() takes a prefix, where one trailing '/' is allowed
        ops.append(store.child)
    for op in ops:
        with pytest.raises(StoreError, match=why):
            op(key)
    assert not os.path.exists(os.path.join(os.path.dirname(store.root), "x"))


def test_bad_list_prefix_rejected(store):
    with pytest.raises(StoreError, match=r"'\.\.'"):
        store.list("../")


def test_symlink_escape_rejected(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    store.write_bytes("ok.png", b"ok")
    os.symlink(outside, tmp_path / "store/linkdir")
    os.symlink(outside / "secret.png", tmp_path / "store/link.png")
    os.symlink(tmp_path / "store/ok.png", tmp_path / "store/inside.png")  # stays inside: fine

    for key in ("linkdir/secret.png", "link.png"):
        with pytest.raises(StoreError, match="outside the store root"):
            store.read_bytes(key)
        with pytest.raises(StoreError, match="outside the store root"):
            store.head(key)
    with pytest.raises(StoreError, match="outside the store root"):
        store.write_bytes("linkdir/new.png", b"x")
    assert not (outside / "new.png").exists()
    with pytest.raises(StoreError, match="outside the store root"):
        store.child("linkdir")
    with pytest.raises(StoreError, match="outside the store root"):
        list(store.list("linkdir/"))
    assert [i.key for i in store.list()] == ["inside.png", "ok.png"]
    assert store.read_bytes("inside.png") == b"ok"


def test_object_not_found_names_the_uri(store):
    store.write_bytes("dir/a.png", b"x")
    for op in (store.head, store.open_read, store.read_bytes):
        with pytest.raises(ObjectNotFound, match=r"file://.*/store/dir/missing\.png"):
            op("dir/missing.png")
    with pytest.raises(ObjectNotFound, match="not a file|directory"):
        store.read_bytes("dir")
    with pytest.raises(ObjectNotFound):
        store.head("dir/a.png/below")


def test_child_and_uri_for(store, tmp_path):
    store.write_bytes("models/m1/manifest.json", b"{}")
    child = store.child("models/")
    assert child.uri == f"file://{tmp_path}/store/models"
    assert [i.key for i in child.list()] == ["m1/manifest.json"]
    assert child.child("m1").read_bytes("manifest.json") == b"{}"
    assert store.uri_for("a/b.png") == f"file://{tmp_path}/store/a/b.png"


def test_open_store_forms_and_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_store(f"file://{tmp_path}/r") == FileStore(tmp_path / "r")
    assert open_store(f"file://localhost{tmp_path}/r") == FileStore(tmp_path / "r")
    assert open_store("rel/dir") == FileStore(tmp_path / "rel/dir")
    assert open_store(str(tmp_path / "r") + "/") == FileStore(tmp_path / "r")
    with pytest.raises(StoreError, match="must be absolute"):
        open_store("file://relative/dir")
    with pytest.raises(StoreError, match="unsupported URI scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="only to s3://"):
        open_store("rel", endpoint_url="http://127.0.0.1:1")

    st, key = resolve(f"file://{tmp_path}/r/img/a.png")
    assert (st, key) == (FileStore(tmp_path / "r/img"), "a.png")
    st.write_bytes(key, b"z")
    assert FileStore(tmp_path / "r").read_bytes("img/a.png") == b"z"
    with pytest.raises(StoreError, match="not a prefix"):
        resolve("dir/")


def test_pickles(store):
    store.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(store))
    assert clone == store and clone.read_bytes("k") == b"v"


def test_a_root_reached_through_a_symlink_reads_and_writes(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")  # the root itself is a link: keys below it are inside
    store = FileStore(tmp_path / "link")
    store.write_bytes("a/b.png", b"x")
    assert store.read_bytes("a/b.png") == b"x" and store.head("a/b.png").size == 1
    assert (tmp_path / "real/a/b.png").read_bytes() == b"x"
    assert not store.exists("a/missing.png") and not store.exists("missing/dir/c.png")
    os.symlink(tmp_path / "real/a", tmp_path / "real/alias")  # a link below the root, resolving inside it
    assert store.read_bytes("alias/b.png") == b"x"
