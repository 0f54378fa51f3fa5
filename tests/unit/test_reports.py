"""Parquet report parts, listing snapshot, summary and success marker (on a FileStore)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from patchaudit.errors import StoreError
from patchaudit.store.objects import FileStore, ObjectInfo
from patchaudit.store.reports import (
    REPORT_SCHEMA,
    ReportError,
    check_row,
    clear_complete,
    is_complete,
    list_parts,
    read_listing,
    read_part,
    read_report,
    read_summary,
    write_listing,
    write_part,
    write_summary,
)


@pytest.fixture
def store(tmp_path) -> FileStore:
    return FileStore(tmp_path / "report")


def ok_row(name: str, score: float = 1.5, **over) -> dict:
    row = dict(
        run_id="run-1",
        image_uri=f"s3://imgs/{name}",
        size=123,
        etag="abc",
        model_id="m1",
        score=score,
        is_anomalous=isinstance(score, float) and score > 2.0,
        threshold=2.0,
        map_max=score,
        map_mean=0.25,
        anomalous_area_fraction=0.0,
        peak_x=3,
        peak_y=4,
        heatmap_uri=None,
        attempt=1,
        worker="w0",
        decode_ms=1.0,
        feature_ms=2.0,
        knn_ms=3.0,
    )
    row.update(over)
    return row


def err_row(name: str, error: str = "decode failed: truncated PNG") -> dict:
    # Only the required columns: every nullable one defaults to None.
    return dict(
        run_id="run-1",
        image_uri=f"s3://imgs/{name}",
        size=7,
        etag="e",
        model_id="m1",
        threshold=2.0,
        error=error,
        attempt=2,
        worker="w1",
    )


def test_parts_round_trip_sorted(store):
    uri = write_part(store, "b0002", [ok_row("z.png", 3.0), err_row("c.png")])
    assert uri == store.uri_for("parts/b0002.parquet")
    numpy_row = ok_row("m.png", np.float32(2.5), peak_x=np.int64(9))  # numpy scalars are fine
    write_part(store, "b0001", [ok_row("a.png"), numpy_row])
    assert list_parts(store) == ["b0001", "b0002"]

    t = read_report(store)
    assert t.schema.equals(REPORT_SCHEMA, check_metadata=True)
    assert t.column("image_uri").to_pylist() == [
        "s3://imgs/a.png",
        "s3://imgs/c.png",
        "s3://imgs/m.png",
        "s3://imgs/z.png",
    ]
    rows = {r["image_uri"]: r for r in t.to_pylist()}
    assert rows["s3://imgs/z.png"]["is_anomalous"] is True
    assert rows["s3://imgs/m.png"]["score"] == 2.5 and rows["s3://imgs/m.png"]["peak_x"] == 9
    failed = rows["s3://imgs/c.png"]
    assert failed["error"].startswith("decode failed")
    assert failed["score"] is None and failed["map_max"] is None and failed["decode_ms"] is None
    assert read_part(store, "b0002").num_rows == 2


def test_required_columns_stay_required_in_parquet(store):
    write_part(store, "b1", [ok_row("a.png")])
    schema = read_part(store, "b1").schema
    assert not schema.field("image_uri").nullable and schema.field("score").nullable
    assert schema.field("peak_x").type == pa.int32()


def test_retried_batch_overwrites_not_duplicates(store):
    write_part(store, "b7", [err_row("a.png"), err_row("b.png")])
    write_part(store, "b7", [ok_row("a.png", attempt=2), ok_row("b.png", attempt=2)])
    t = read_report(store)
    assert t.num_rows == 2
    assert t.column("error").to_pylist() == [None, None]
    assert t.column("attempt").to_pylist() == [2, 2]
    assert [i.key for i in store.list()] == ["parts/b7.parquet"]


def test_empty_report(store):
    store.write_bytes("listing.parquet", b"")  # the store exists but holds no parts
    t = read_report(store)
    assert t.num_rows == 0 and t.schema.equals(REPORT_SCHEMA)


@pytest.mark.parametrize(
    "row, why",
    [
        (ok_row("a.png", colour="red"), r"unknown columns \['colour'\]"),
        ({k: v for k, v in ok_row("a.png").items() if k != "etag"}, "'etag' is required"),
        (ok_row("a.png", size="123"), "'size' must be an int"),
        (ok_row("a.png", size=True), "'size' must be an int"),
        (ok_row("a.png", peak_x=2**31), "'peak_x' must be an int"),
        (ok_row("a.png", score="high"), "'score' must be a float"),
        (ok_row("a.png", score=float("nan")), "NaN/inf"),
        (ok_row("a.png", is_anomalous=1), "'is_anomalous' must be a bool"),
        (ok_row("a.png", score=None), "needs 'score'"),
        (ok_row("a.png", error="boom"), "must have score and is_anomalous None"),
        (err_row("a.png", error=""), "non-empty"),
        ("not a row", "must be a dict"),
    ],
)
def test_schema_validation_errors(store, row, why):
    with pytest.raises(ReportError, match=why):
        write_part(store, "b1", [ok_row("fine.png"), row])
    assert list_parts(store) == []  # nothing written on a bad batch


def test_validation_names_batch_and_row(store):
    with pytest.raises(ReportError, match=r"batch 'b9' row 1"):
        write_part(store, "b9", [ok_row("a"), ok_row("b", size=-1.5)])
    assert check_row(err_row("x"))["score"] is None


def test_duplicate_image_in_batch_rejected(store):
    with pytest.raises(ReportError, match="appears twice"):
        write_part(store, "b1", [ok_row("a.png"), err_row("a.png")])


@pytest.mark.parametrize("batch_id", ["", "../x", "a/b", ".hidden", "b 1", "x" * 129, None, "b\\1"])
def test_bad_batch_ids(store, batch_id):
    with pytest.raises(ReportError, match="invalid batch id"):
        write_part(store, batch_id, [ok_row("a.png")])


def test_list_parts_ignores_stray_files(store):
    write_part(store, "b-1.retry_2", [ok_row("a.png")])
    store.write_bytes("parts/notes.txt", b"x")
    store.write_bytes("parts/nested/b2.parquet", b"x")
    store.write_bytes("parts/.hidden.parquet", b"x")
    assert list_parts(store) == ["b-1.retry_2"]


def test_corrupt_or_foreign_part_is_reported(store):
    store.write_bytes("parts/bad.parquet", b"not parquet")
    with pytest.raises(ReportError, match="not a readable Parquet"):
        read_report(store)
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_uri": ["x"]}), buf)
    store.write_bytes("parts/bad.parquet", buf.getvalue())
    with pytest.raises(ReportError, match="does not match the expected schema"):
        read_report(store)


def test_listing_round_trip(store):
    infos = [
        ObjectInfo("a/1.png", 10, "e1", "s3://imgs/a/1.png"),
        ObjectInfo("b/2.png", 2**40, "0f-1", "s3://imgs/b/2.png"),
    ]
    assert write_listing(store, infos) == store.uri_for("listing.parquet")
    assert read_listing(store) == infos
    write_listing(store, [])
    assert read_listing(store) == []
    with pytest.raises(ReportError, match="must be an ObjectInfo"):
        write_listing(store, [("a", 1, "e", "u")])


def test_summary_then_success_last(store, monkeypatch):
    written = []
    real = store.write_bytes

    def spy(key, data):
        # When _SUCCESS lands, the summary must already be complete on disk.
        if key == "_SUCCESS":
            assert json.loads(store.read_bytes("summary.json")) == {"images": 3, "errors": 1}
        written.append(key)
        return real(key, data)

    monkeypatch.setattr(store, "write_bytes", spy)
    assert not is_complete(store)
    write_summary(store, {"images": 3, "errors": 1})
    assert written == ["summary.json", "_SUCCESS"]
    assert is_complete(store)
    assert read_summary(store) == {"images": 3, "errors": 1}
    clear_complete(store)
    assert not is_complete(store)


def test_failed_success_marker_leaves_report_incomplete(store, monkeypatch):
    real = store.write_bytes

    def fail_success(key, data):
        if key == "_SUCCESS":
            raise StoreError("network down")
        return real(key, data)

    monkeypatch.setattr(store, "write_bytes", fail_success)
    with pytest.raises(StoreError, match="network down"):
        write_summary(store, {"images": 1})
    assert store.exists("summary.json") and not is_complete(store)


def test_summary_must_be_plain_json(store):
    with pytest.raises(ReportError, match="plain JSON"):
        write_summary(store, {"when": object()})
    with pytest.raises(ReportError, match="plain JSON"):
        write_summary(store, {"auroc": float("nan")})
    assert not store.exists("summary.json") and not is_complete(store)


def test_plain_rows_take_the_columnar_check_and_write_what_the_row_check_writes(store):
    from patchaudit.store.reports import _plain_columns

    rows = [ok_row(f"{i}.png", float(i)) if i % 2 else err_row(f"{i}.png") for i in range(9)]
    rows[1]["threshold"] = 2  # an int in a float column, as check_row takes it
    assert _plain_columns(rows) is not None
    write_part(store, "b0001", rows)
    expected = pa.Table.from_pylist([check_row(r) for r in rows], schema=REPORT_SCHEMA)
    assert read_part(store, "b0001").equals(expected)
    # Rows the columnar check does not vouch for go through check_row: converted, or refused with the row.
    numpy_row = ok_row("np.png", score=np.float32(1.5), peak_x=np.int64(3), is_anomalous=np.bool_(False))
    assert _plain_columns([numpy_row]) is None
    write_part(store, "b0002", [numpy_row])
    assert read_part(store, "b0002").column("peak_x").to_pylist() == [3]
    for bad, match in [
        (ok_row("a.png", score=float("nan")), "row 0.*NaN"),
        (ok_row("a.png", peak_x=True), "row 0.*peak_x"),
        (ok_row("a.png", size=2**70), "row 0.*size"),
        (err_row("a.png", error=""), "row 0.*non-empty"),
        (dict(err_row("a.png"), score=1.0), "row 0.*score and is_anomalous None"),
        (ok_row("a.png", is_anomalous=None), "row 0.*needs 'score' and 'is_anomalous'"),
        (dict(ok_row("a.png"), colour="red"), "row 0.*unknown columns"),
    ]:
        assert _plain_columns([bad]) is None
        with pytest.raises(ReportError, match=match):
            write_part(store, "b0003", [bad])
    with pytest.raises(ReportError, match="appears twice"):
        write_part(store, "b0003", [err_row("a.png"), err_row("a.png")])
