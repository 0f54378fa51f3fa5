"""S3Store parts that need no server: URI parsing, options, pickling, lazy boto3 import."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from patchaudit.errors import StoreError
from patchaudit.store.objects import S3Store, open_store, resolve


def test_uri_parsing_and_uri_for():
    s = open_store("s3://my-bucket/reports/run1/")
    assert isinstance(s, S3Store)
    assert (s.bucket, s.prefix) == ("my-bucket", "reports/run1")
    assert s.uri == "s3://my-bucket/reports/run1"
    assert s.uri_for("parts/b1.parquet") == "s3://my-bucket/reports/run1/parts/b1.parquet"
    root = S3Store("s3://my-bucket")
    assert (root.prefix, root.uri, root.uri_for("k")) == ("", "s3://my-bucket", "s3://my-bucket/k")
    assert root.child("a/").child("b").uri == "s3://my-bucket/a/b"


@pytest.mark.parametrize(
    "uri, why",
    [
        ("s3://Bad_Bucket/x", "invalid bucket name"),
        ("s3://ab/x", "invalid bucket name"),
        ("s3://bucket/../x", r"'\.\.'"),
        ("s3://bucket//x", "absolute"),
        ("s3:/bucket/x", "malformed URI"),
    ],
)
def test_bad_s3_uris(uri, why):
    with pytest.raises(StoreError, match=why):
        open_store(uri)


def test_bad_keys_rejected_before_any_request():
    s = S3Store("s3://bucket/p", endpoint_url="http://127.0.0.1:9")
    for key in ("../x", "/abs", "a\\b", "a//b"):
        with pytest.raises(StoreError):
            s.head(key)
        with pytest.raises(StoreError):
            s.write_bytes(key, b"x")
    with pytest.raises(StoreError, match=r"'\.\.'"):
        s.list("../")
    with pytest.raises(StoreError, match="page_size"):
        s.list(page_size=5000)


def test_bad_options():
    with pytest.raises(StoreError, match="retry_mode"):
        S3Store("s3://bucket", retry_mode="legacy")
    with pytest.raises(StoreError, match="addressing_style"):
        S3Store("s3://bucket", addressing_style="vhost")
    with pytest.raises(StoreError, match="max_attempts"):
        S3Store("s3://bucket", max_attempts=0)


def test_resolve_s3():
    st, key = resolve("s3://bucket/a/b/c.png", addressing_style="path")
    assert (st.uri, key) == ("s3://bucket/a/b", "c.png")
    assert st.options["addressing_style"] == "path"
    st, key = resolve("s3://bucket/c.png")
    assert (st.uri, key) == ("s3://bucket", "c.png")
    with pytest.raises(StoreError, match="names a bucket"):
        resolve("s3://bucket")


def test_pickle_drops_client_keeps_options():
    s = S3Store("s3://bucket/p", endpoint_url="http://127.0.0.1:9", addressing_style="path", max_attempts=2)
    s._client()  # a live client must not travel
    data = pickle.dumps(s)
    assert b"botocore" not in data and b"boto3" not in data
    clone = pickle.loads(data)
    assert clone == s and clone.options["max_attempts"] == 2
    assert set(vars(clone)) == {"_bucket", "_prefix", "_options"}  # no client state


def test_one_client_per_options_and_environment(monkeypatch):
    s = S3Store("s3://bucket/p", endpoint_url="http://127.0.0.1:9")
    c = s._client()
    assert s._client() is c and s.child("x")._client() is c
    assert pickle.loads(pickle.dumps(s))._client() is c  # same process: reused
    assert c.meta.config.retries == {"mode": "standard", "total_max_attempts": 8}
    assert S3Store("s3://bucket/p", endpoint_url="http://127.0.0.1:10")._client() is not c
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")  # env changes give a fresh client
    c2 = s._client()
    assert c2 is not c and c2.meta.region_name == "eu-west-3"


def test_importing_store_does_not_import_boto3():
    code = (
        "import sys, patchaudit.store.objects, patchaudit.store.reports; "
        "s = patchaudit.store.objects.open_store('s3://bucket/p'); s.uri_for('k'); "
        "sys.exit(1 if 'boto3' in sys.modules or 'botocore' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
