"""Finishing in bounded memory: the streamed listing, compaction of parts, the exactly-once check.

All on a FileStore with synthetic rows (no model): the plan is made by the same code as a run, the
parts are written as workers write them, and `finish_report` compacts, checks and summarizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchaudit.mining.reportio import open_report, read_columns
from patchaudit.review.data import collect
from patchaudit.scheduler.finish import check_complete, finish_report
from patchaudit.scheduler.plan import RunError, batch_id, commit_plan, cut, prepare_plan
from patchaudit.scheduler.summary import summarize
from patchaudit.store import compaction, reports
from patchaudit.store import listing as listings
from patchaudit.store.batch_listing import BatchListing
from patchaudit.store.objects import FileStore, ObjectInfo

BATCH = 4
N = 23  # 6 batches, the last one short


def _infos(n: int) -> list[ObjectInfo]:
    return [ObjectInfo(f"d{i % 3}/{i:05d}.png", i, f"e{i}", f"file:///in/d{i % 3}/{i:05d}.png") for i in range(n)]


def test_spool_writes_row_groups_and_slices_cross_them(tmp_path: Path) -> None:
    infos = sorted(_infos(50), key=lambda i: i.key)
    sp = listings.ListingSpool(row_group=8)
    sp.extend(infos)
    store = FileStore(tmp_path / "r")
    sp.commit(store)
    with listings.local_listing(store) as path:
        import pyarrow.parquet as pq

        assert pq.ParquetFile(path).num_row_groups == 7  # streamed: never one table of the whole listing
        assert list(listings.iter_infos(path)) == infos
        s = listings.ListingSlices(path)
        assert s.slice(5, 10) == infos[5:15]  # across a row-group boundary
        assert s.slice(48, 10) == infos[48:]  # short at the end
        assert s.slice(60, 4) == []
        batches = list(cut("r", listings.iter_keys(path), 7))
    assert [b.batch_id for b in batches] == [batch_id(n) for n in range(8)]
    assert [k for b in batches for k in b.keys] == [i.key for i in infos]
    assert [len(b.keys) for b in batches] == [7] * 7 + [1]
    assert reports.read_listing(store) == infos


def _planned(tmp_path: Path, n: int = N) -> tuple[FileStore, object, list[ObjectInfo]]:
    src = FileStore(tmp_path / "in")
    infos = sorted(_infos(n), key=lambda i: i.key)
    report = FileStore(tmp_path / "report")
    plan = prepare_plan(report, src, "run-1", BATCH, "m1", "file:///model", "distributed", infos)
    commit_plan(report, plan)
    return report, plan, infos


def _row(info: ObjectInfo, score: float) -> dict:
    return {
        "run_id": "run-1",
        "image_uri": info.uri,
        "size": info.size,
        "etag": info.etag,
        "model_id": "m1",
        "score": score,
        "is_anomalous": score > 2.0,
        "threshold": 2.0,
        "attempt": 0,
        "worker": "w",
    }


def _write_all(report: FileStore, infos: list[ObjectInfo], skip: tuple[int, ...] = ()) -> None:
    for n in range(-(-len(infos) // BATCH)):
        if n in skip:
            continue
        batch = infos[n * BATCH : (n + 1) * BATCH]
        reports.write_part(report, batch_id(n), [_row(i, float(i.size % 7) / 2) for i in batch])


def _finish(report: FileStore, plan: object) -> dict:
    return finish_report(
        report, plan, model_id="m1", threshold=2.0, top_k=5, seconds=1.0, extra={"mode": "test"}, images_now=None
    )


def test_finish_compacts_and_summarizes_like_the_whole_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(compaction, "TARGET_BYTES", 1)  # a new file after every part: many files
    report, plan, infos = _planned(tmp_path)
    _write_all(report, infos)
    before = reports.read_report(report)
    out = _finish(report, plan)
    manifest = compaction.read_manifest(report)
    assert manifest is not None and manifest["rows"] == N and len(manifest["files"]) >= 2
    assert reports.sources(report).parts == []  # readers use the compacted files now
    after = reports.read_report(report)
    assert after.equals(before)
    ref = summarize(before, run_id="run-1", model_id="m1", threshold=2.0, top_k=5, seconds=1.0, n_listed=N, extra=None)
    for k in ("rows", "scored", "anomalous", "errors", "top_anomalous", "score_distribution"):
        assert out[k] == pytest.approx(ref[k]) if k == "score_distribution" else out[k] == ref[k]
    assert reports.is_complete(report)
    # every reader sees each row once
    assert [b for b, _ in reports.iter_batches(report)] == [batch_id(n) for n in range(6)]
    mined = read_columns(open_report(report.uri), ["image_uri", "score"])
    assert sorted(mined["image_uri"].to_pylist()) == sorted(i.uri for i in infos)
    assert collect(report).rows == N


def test_compaction_is_idempotent_and_ignores_a_stale_manifest(tmp_path: Path) -> None:
    report, plan, infos = _planned(tmp_path)
    _write_all(report, infos)
    first = compaction.compact(report)
    stamp = (tmp_path / "report" / compaction.MANIFEST_KEY).stat().st_mtime_ns
    assert compaction.compact(report) == first
    assert (tmp_path / "report" / compaction.MANIFEST_KEY).stat().st_mtime_ns == stamp  # nothing rewritten
    # A part rewritten after compaction (e.g. a batch redone): the manifest no longer matches, so
    # readers read the parts, never a stale or doubled row.
    reports.write_part(report, batch_id(1), [_row(i, 9.0) for i in infos[4:8]])
    assert reports.sources(report).compacted == []
    t = reports.read_report(report)
    assert t.num_rows == N and sorted(t.filter(t["score"].is_valid())["image_uri"].to_pylist()) == sorted(
        i.uri for i in infos
    )
    assert max(t["score"].to_pylist()) == 9.0
    second = compaction.compact(report)
    assert second["rows"] == N and reports.sources(report).parts == []
    assert max(reports.read_report(report)["score"].to_pylist()) == 9.0


def test_a_crash_during_compaction_leaves_a_consistent_report(tmp_path: Path, monkeypatch) -> None:
    report, plan, infos = _planned(tmp_path)
    _write_all(report, infos)
    real = report.write_bytes

    def crash(key: str, data: bytes):
        if key == compaction.MANIFEST_KEY:
            raise OSError("killed while compacting")
        return real(key, data)

    monkeypatch.setattr(report, "write_bytes", crash)
    with pytest.raises(OSError):
        _finish(report, plan)
    monkeypatch.undo()
    assert list((tmp_path / "report" / "compact").glob("*.parquet"))  # files were written ...
    assert reports.sources(report).compacted == []  # ... but without a manifest nobody reads them
    assert reports.read_report(report).num_rows == N and not reports.is_complete(report)
    out = _finish(report, plan)  # the resumed finish compacts again
    assert out["rows"] == N and reports.read_report(report).num_rows == N


def test_resume_after_compaction_finishes_once(tmp_path: Path) -> None:
    report, plan, infos = _planned(tmp_path)
    _write_all(report, infos, skip=(2,))
    with pytest.raises(RunError, match=r"4 listed image\(s\) have no report row yet"):
        _finish(report, plan)
    assert compaction.read_manifest(report) is not None  # compacted what was there
    # The resumed run scores the missing batch and finishes: rows counted once.
    resumed = prepare_plan(report, FileStore(tmp_path / "in"), "run-1", BATCH, "m1", "file:///model", "distributed")
    assert resumed.resumed and resumed.images == N and resumed.n_batches == 6
    _write_all(report, infos, skip=(0, 1, 3, 4, 5))
    out = _finish(report, resumed)
    assert (out["rows"], out["images_listed"]) == (N, N)
    assert reports.read_report(report).num_rows == N


def test_check_complete_finds_duplicates_strays_and_foreign_rows(tmp_path: Path) -> None:
    report, plan, infos = _planned(tmp_path)
    _write_all(report, infos)
    assert check_complete(report, plan) == N
    reports.write_part(report, "b000099", [_row(infos[0], 1.0)])
    with pytest.raises(RunError, match="of a batch the run did not plan"):
        check_complete(report, plan)
    report.delete(reports.part_key("b000099"))
    reports.write_part(report, batch_id(1), [_row(i, 1.0) for i in infos[4:8]] + [_row(infos[0], 1.0)])
    with pytest.raises(RunError, match="outside its batch"):
        check_complete(report, plan)


def test_worker_listing_gives_a_batch_only_its_own_images(tmp_path: Path) -> None:
    report, plan, infos = _planned(tmp_path)
    bl = BatchListing(report)
    keys = [i.key for i in infos[4:8]]
    assert list(bl.infos(batch_id(1), keys).values()) == infos[4:8]
    with pytest.raises(LookupError, match="not in the run's listing snapshot"):
        bl.infos(batch_id(2), keys)  # listed, but not this batch's
    with pytest.raises(LookupError, match="not in the run's listing snapshot"):
        bl.infos(batch_id(1), [*keys, "not/listed.png"])
    assert json.loads(report.read_bytes("run.json"))["images"] == N


def test_a_smaller_recompaction_leaves_no_stale_files(tmp_path: Path, monkeypatch) -> None:
    report, plan, infos = _planned(tmp_path)
    _write_all(report, infos)
    many = compaction.compact(report, target_bytes=1)
    assert len(many["files"]) == 6
    reports.write_part(report, batch_id(0), [_row(i, 1.0) for i in infos[:4]])  # the manifest goes stale
    one = compaction.compact(report)
    assert [f["key"] for f in one["files"]] == ["compact/c00000.parquet"]
    # A glob over compact/ (e.g. DuckDB's read_parquet) sees each row once too.
    assert sorted(p.name for p in (tmp_path / "report" / "compact").glob("*.parquet")) == ["c00000.parquet"]


def test_a_long_object_listing_is_sorted_through_spilled_runs(tmp_path: Path) -> None:
    """An S3 listing longer than SORT_RUN is sorted with sorted runs on disk, never all in memory."""
    import random

    from patchaudit.store.objects import _Found, sorted_by_key

    infos = _infos(1000)
    random.Random(0).shuffle(infos)
    found = _Found(run_size=128)
    for i in infos:
        found.append(i)
    assert len(found.runs) == 7 and len(found) == 1000 - 7 * 128  # at most one run in memory
    runs = list(found.runs)
    out = list(sorted_by_key(found))
    assert out == sorted(infos, key=lambda i: i.key)
    assert not any(Path(p).exists() for p in runs)  # the runs are removed
    small = _Found(run_size=128)
    small.extend(infos[:5])
    assert list(sorted_by_key(small)) == sorted(infos[:5], key=lambda i: i.key)
