"""benchmarks/plan_scale.py: its fake input, the rows it writes, and a whole small run (real Redis)."""

from __future__ import annotations

import json
import shutil

import pytest
from bench_scripts import load_benchmark

from patchaudit.store.reports import REPORT_SCHEMA, check_row


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("plan_scale.py")


def test_fake_store_lists_n_images_in_key_order(bench):
    infos = list(bench.make_fake_store(250_001).list())
    keys = [i.key for i in infos]
    assert len(keys) == 250_001 and len(set(keys)) == len(keys)
    assert keys == sorted(keys)
    assert infos[0].uri == "fake://archive/" + infos[0].key


def test_error_rows_are_valid_report_rows(bench):
    infos = list(bench.make_fake_store(3).list())
    t = bench.error_rows("run-1", infos)
    assert t.schema.equals(REPORT_SCHEMA, check_metadata=False)
    for i, row in enumerate(t.to_pylist()):
        check_row(row, f"row {i}")


def test_args_are_checked(bench):
    with pytest.raises(SystemExit, match="must be positive"):
        bench.parse_args(["--images", "0"])


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_a_small_run_plans_queues_and_finishes_every_image(bench, tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--images", "1000", "--batch-size", "64", "--out", str(out), "--run-id", "bench-small"]) == 0
    res = json.loads((out / "plan_scale_1000.json").read_text())
    assert res["plan_queue"]["batches"] == 16 and res["parts"]["parts"] == 16
    assert res["finish"]["rows"] == 1000 and res["finish"]["errors"] == 1000
    assert res["finish"]["compacted"]["files"] == 1
    assert 0 < res["scheduler_peak_rss_mb"] < 2048
    assert [s["step"] for s in res["plan_queue"]["steps"]] == ["plan", "queue"]


def test_compaction_mode(bench, tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--compaction", "--rows", "500", "--part-rows", "32", "--out", str(out)]) == 0
    res = json.loads((out / "compaction.json").read_text())["compaction"]
    assert (res["rows"], res["parts"], res["read_rows"], res["files"]) == (500, 16, 500, 1)


def test_scored_rows_are_valid_report_rows(bench):
    infos = list(bench.make_fake_store(40).list())
    t = bench.scored_rows("run-1", infos, seed=0)
    rows = t.to_pylist()
    for i, row in enumerate(rows):
        check_row(row, f"row {i}")
    assert sum(r["is_anomalous"] for r in rows) == 2  # the top 5%
    assert all((r["heatmap_uri"] is not None) == r["is_anomalous"] for r in rows)
