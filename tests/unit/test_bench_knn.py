"""benchmarks/knn.py: its block parser, and a whole run on the session's small real model."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("knn.py")


def test_parse_blocks(bench):
    assert bench.parse_blocks("2048x1024, 8x3,") == [(2048, 1024), (8, 3)]
    for bad in ("2048", "0x4", "ax4", "4x-1"):
        with pytest.raises(SystemExit, match="QUERYxCHUNK"):
            bench.parse_blocks(bad)


def test_timed_reports_per_image_median_and_best(bench):
    calls = []
    r = bench.timed(lambda: calls.append(1), reps=3, n_images=4)
    assert len(calls) == 4  # one warm-up + three timed
    assert 0 <= r["best_ms_per_image"] <= r["median_ms_per_image"]


def test_run_on_a_real_model_agrees_with_faiss(bench, small_model, tmp_path, capsys):
    out = tmp_path / "r" / "knn.json"
    assert (
        bench.main(
            [
                "--model",
                str(small_model.path),
                "--data",
                str(small_model.data_dir),
                "--images",
                "2",
                "--reps",
                "1",
                "--blocks",
                "512x300",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["queries"] == 2 * 32 * 32
    rows = result["backends"]
    assert set(rows) == {"faiss-flat", "torch 2048x1024 (default)", "torch 512x300"}
    for name, r in rows.items():
        if name != "faiss-flat":  # exact both: ids differ only at float32 near-ties
            assert r["nn_id_differs_share"] < 0.01 and r["max_abs_dist_diff"] < 1e-2
    assert "faiss-flat" in capsys.readouterr().out
