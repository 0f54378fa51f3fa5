"""S3Store against a real SeaweedFS S3 server (see conftest.py)."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from patchaudit.errors import ObjectNotFound, StoreError
from patchaudit.store.objects import S3Store, open_store, resolve
from patchaudit.store.reports import is_complete, read_report, write_part, write_summary

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(s3_env) -> str:
    return s3_env.make_bucket(f"pa-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(bucket) -> S3Store:
    s = open_store(f"s3://{bucket}/base", addressing_style="path")
    assert isinstance(s, S3Store)
    return s


def test_round_trip_head_etag(store, bucket, s3_env):
    data = b"\x89PNG fake image bytes"
    info = store.write_bytes("img/a.png", data)
    assert info.etag == hashlib.md5(data).hexdigest()  # single PUT: ETag is the MD5, no quotes
    head = store.head("img/a.png")
    assert head == info
    assert (head.key, head.size) == ("img/a.png", len(data))
    assert head.uri == f"s3://{bucket}/base/img/a.png"
    assert store.read_bytes("img/a.png") == data
    assert store.exists("img/a.png") and not store.exists("img/b.png")
    # Really stored under the root prefix.
    raw = s3_env.client().get_object(Bucket=bucket, Key="base/img/a.png")["Body"].read()
    assert raw == data


def test_streaming_read(store):
    payload = os.urandom(256 * 1024)
    store.write_bytes("big.bin", payload)
    with store.open_read("big.bin") as body:
        first = body.read(1000)
        chunks = list(iter(lambda: body.read(64 * 1024), b""))
    assert body.closed
    assert first + b"".join(chunks) == payload and len(first) == 1000
    assert len(chunks) == 4  # streamed in pieces, not read whole
    with store.open_read("big.bin") as body:
        assert body.read() == payload


def test_write_file_and_delete(store, tmp_path):
    local = tmp_path / "shard.faiss"
    local.write_bytes(os.urandom(100_000))
    info = store.write_file("models/m1/shard0.faiss", local)
    assert info.size == 100_000
    assert store.read_bytes("models/m1/shard0.faiss") == local.read_bytes()
    store.delete("models/m1/shard0.faiss")
    assert not store.exists("models/m1/shard0.faiss")
    store.delete("models/m1/shard0.faiss")  # idempotent


def test_object_not_found(store, bucket):
    for op in (store.head, store.open_read, store.read_bytes):
        with pytest.raises(ObjectNotFound, match=f"s3://{bucket}/base/nope.png"):
            op("nope.png")
    missing = open_store("s3://no-such-bucket-pa/x", addressing_style="path")
    with pytest.raises(ObjectNotFound, match="bucket 'no-such-bucket-pa' does not exist"):
        list(missing.list())
    with pytest.raises(ObjectNotFound):
        missing.read_bytes("k")


def test_list_paginates_filters_and_sorts(store, s3_env, bucket):
    n = 320
    keys = [f"imgs/{i:04d}.png" for i in range(n)]
    extra = ["imgs/notes.TXT", "imgs/UPPER.PNG", "imgs.png", "other/0001.png", "imgsX/1.png"]
    client = s3_env.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=f"base/{k}", Body=b"x"), keys + extra))
    client.put_object(Bucket=bucket, Key="outside-base.png", Body=b"x")

    calls = []
    store._client().meta.events.register(
        "after-call.s3.ListObjectsV2", lambda **kw: calls.append(kw["parsed"].get("KeyCount"))
    )
    got = list(store.list("imgs/", extensions=(".png",), page_size=100))
    assert [i.key for i in got] == sorted(keys + ["imgs/UPPER.PNG"])
    assert len(got) == n + 1
    assert len(calls) >= 4  # 326 keys under 'imgs' at 100 a page: really paginated
    assert all(i.size == 1 and i.uri == f"s3://{bucket}/base/{i.key}" for i in got)

    everything = [i.key for i in store.list(page_size=100)]
    assert everything == sorted(everything) and len(everything) == n + len(extra)
    assert [i.key for i in store.list("imgs")][-1] == "imgsX/1.png"  # string-prefix semantics
    assert list(store.list("nothing/")) == []


def test_child_and_resolve(store, bucket):
    run = store.child("reports/run-1/")
    assert run.uri == f"s3://{bucket}/base/reports/run-1"
    run.write_bytes("summary.json", b"{}")
    assert store.read_bytes("reports/run-1/summary.json") == b"{}"
    assert [i.key for i in run.list()] == ["summary.json"]
    parent, key = resolve(f"s3://{bucket}/base/reports/run-1/summary.json", addressing_style="path")
    assert (parent.uri, key) == (run.uri, "summary.json")
    assert parent.read_bytes(key) == b"{}"


def test_pickles_and_works_after(store):
    store.write_bytes("k.txt", b"before")  # the client exists now; it must not be shipped
    clone = pickle.loads(pickle.dumps(store))
    assert clone == store
    assert clone.read_bytes("k.txt") == b"before"
    clone.write_bytes("k.txt", b"after")
    assert store.read_bytes("k.txt") == b"after"


def test_unpickles_in_another_process(store):
    store.write_bytes("k.txt", b"cross-process")
    code = (
        "import pickle, sys; s = pickle.loads(sys.stdin.buffer.read()); "
        "sys.stdout.buffer.write(s.read_bytes('k.txt')); s.write_bytes('from-child', b'ok')"
    )
    # The child inherits the s3_env variables: endpoint and credentials come from there.
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(store), capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"cross-process"
    assert store.read_bytes("from-child") == b"ok"


def test_bad_credentials_give_clear_store_error(bucket, s3_env):
    bad = S3Store(
        f"s3://{bucket}/base",
        aws_access_key_id=s3_env.access_key,
        aws_secret_access_key="wrong-secret",
        addressing_style="path",
        max_attempts=2,
    )
    with pytest.raises(StoreError, match="access denied .* check the credentials") as e:
        list(bad.list())
    assert not isinstance(e.value, ObjectNotFound)
    with pytest.raises(StoreError, match="access denied"):
        bad.write_bytes("k", b"x")
    with pytest.raises(StoreError, match="access denied"):
        bad.head("k")


def test_unreachable_endpoint_is_a_store_error(bucket, s3_env):
    dead = S3Store(f"s3://{bucket}", endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout=1)
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
        dead.head("k")


def test_report_on_s3(store):
    run = store.child("reports/run-2")
    row = dict(
        run_id="run-2",
        image_uri="s3://imgs/a.png",
        size=1,
        etag="e",
        model_id="m",
        score=0.5,
        is_anomalous=False,
        threshold=1.0,
        attempt=1,
        worker="w",
    )
    write_part(run, "b1", [row])
    write_part(run, "b1", [row])  # retried batch: overwritten
    write_summary(run, {"images": 1})
    assert read_report(run).num_rows == 1 and is_complete(run)
