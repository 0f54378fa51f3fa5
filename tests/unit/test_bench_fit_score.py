"""The pure helpers of benchmarks/fit_score.py (the benchmark itself needs the real data and minutes)."""

from __future__ import annotations

import numpy as np
import pytest
from bench_scripts import load_benchmark

from patchaudit.errors import ConfigError
from patchaudit.scheduler.config import Config


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("fit_score.py")


def test_overrides_change_only_what_was_asked(bench):
    base = Config()
    cfg = bench.apply_overrides(
        base, coreset=0.05, index="hnsw", backbone="mobilenetv2_100", ef_search=64, decode_threads=1
    )
    pc = cfg.model.patchcore
    assert (pc.coreset_ratio, pc.index, pc.hnsw_ef_search, cfg.model.backbone) == (0.05, "hnsw", 64, "mobilenetv2_100")
    assert cfg.run.decode_threads == 1
    assert pc.ivf_nprobe == base.model.patchcore.ivf_nprobe and cfg.model.layers == base.model.layers
    assert bench.apply_overrides(base) == base


@pytest.mark.parametrize("kw", [{"coreset": 0.0}, {"coreset": 1.5}, {"nprobe": 0}, {"decode_threads": 0}])
def test_bad_overrides_are_config_errors(bench, kw):
    with pytest.raises(ConfigError):
        bench.apply_overrides(Config(), **kw)


def test_true_sq_dists_are_exact_where_the_expansion_is_not(bench):
    rng = np.random.default_rng(0)
    bank = (rng.normal(size=(50, 16)) * 20).astype(np.float32)  # norms^2 in the thousands, like real features
    q = bank[[3, 7]] + np.float32(1e-3)  # each query 1.6e-5 (squared) from a bank vector
    d = bench.true_sq_dists(q, bank, np.array([3, 7]))
    np.testing.assert_allclose(d, 16 * (np.float64(np.float32(1e-3)) ** 2), rtol=1e-2)
    assert bench.true_sq_dists(bank[:4], bank, np.arange(4)).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_recall_stats_ids_ties_and_miss_ratios(bench):
    exact_ids, exact_d = np.array([10, 11, 12, 13]), np.array([1.0, 2.0, 3.0, 4.0])
    approx_ids, approx_d = np.array([10, 99, 12, 14]), np.array([1.0, 2.0, 3.0, 16.0])
    # row 1: another id at the same distance (a duplicate vector); row 3: a neighbour twice as far
    st = bench.recall_stats(approx_ids, exact_ids, approx_d, exact_d)
    assert (st["same_id"], st["same_distance"], st["queries"]) == (2, 3, 4)
    np.testing.assert_allclose(st["miss_ratios"], [2.0])
    st = bench.recall_stats(exact_ids, exact_ids, exact_d, exact_d)
    assert (st["same_id"], st["same_distance"], st["miss_ratios"].size) == (4, 4, 0)


def test_metric_deltas(bench):
    d = bench.metric_deltas(
        {"image_auroc": 0.99, "pixel_auroc": 0.9, "aupro": None}, {"image_auroc": 1.0, "pixel_auroc": 0.8, "aupro": 0.7}
    )
    assert d["image_auroc"] == pytest.approx(-0.01) and d["pixel_auroc"] == pytest.approx(0.1)
    assert d["aupro"] is None


class FakeClock:
    """Stands in for the `time` module inside the benchmark: wall and CPU seconds advance only when a
    test says so, so the Stopwatch arithmetic is checked without measuring anything."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def perf_counter(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu

    def spend(self, wall: float, cpu: float) -> None:
        self.wall += wall
        self.cpu += cpu


def test_stopwatch_sums_per_stage(bench, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    watch = bench.Stopwatch()
    for wall in (0.02, 0.03):
        with watch("sleep"):
            clock.spend(wall, 0.0)  # sleeping costs no CPU
        with watch("spin"):
            clock.spend(0.02, 0.02)
    with watch("batch", n=4):
        clock.spend(0.04, 0.06)  # two threads busy part of the time
    per = watch.per_item(2)
    assert set(per) == {"sleep", "spin", "batch"}
    assert per["sleep"] == pytest.approx({"wall": 25.0, "cpu": 0.0, "best": 20.0})  # mean of 2 items; best call
    assert per["spin"] == pytest.approx({"wall": 20.0, "cpu": 20.0, "best": 20.0})
    assert per["batch"] == pytest.approx({"wall": 20.0, "cpu": 30.0, "best": 10.0})  # best is per item: 40 ms / 4


def _result(approx: bool) -> dict:
    stages = {
        k: {"wall": 1.5, "cpu": 1.0, "best": 0.5}
        for k in ("read", "decode", "features", "knn", "smooth", "to_original", "map_stats", "maps_total", "sum")
    }
    stages["knn_search_only"] = {"wall": 1.25, "cpu": None, "best": None}
    acc = {
        "image_auroc": 0.9876,
        "pixel_auroc": 0.95,
        "aupro": None,
        "threshold": 2.0,
        "f1": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "n_images": 10,
        "pixel_images": 9,
        "pixel_excluded": 1,
        "per_defect": {"crack": {"count": 4, "image_auroc": 0.75, "pixel_auroc": 0.5, "aupro": 0.25}},
    }
    score = {
        "accuracy": acc,
        "stages_ms_per_image": stages,
        "n_test_images": 10,
        "n_scored": 10,
        "batch_size": 4,
        "decode_threads": 2,
        "torch_threads": 2,
        "images_per_s": 3.5,
        "end_to_end_s": 2.0,
        "end_to_end_cpu_s": 3.0,
        "peak_rss_mb_scoring": 100.0,
        "peak_rss_mb_with_evaluation": 120.0,
        "index": {"type": "IndexHNSWFlat"},
    }
    if approx:
        score["approximate"] = {
            "recall_at_1_same_id": 0.9,
            "recall_at_1_same_distance": 0.95,
            "queries": 100,
            "missed_patches": 5,
            "miss_distance_ratio_median": 1.5,
            "miss_distance_ratio_max": None,
            "images_with_a_changed_score": 3,
            "image_score_abs_err_max": 0.5,
            "image_score_abs_err_mean": 0.25,
            "exact_image_score_median": 2.0,
            "exact_accuracy": acc,
            "search_ms_per_image": {
                "approx": {"wall": 4.0, "cpu": 3.0, "best": 2.0},
                "exact": {"wall": 40.0, "cpu": 30.0, "best": 20.0},
            },
            "delta_vs_exact": {"image_auroc": -0.01, "pixel_auroc": 0.0, "aupro": None},
        }
    fit = {
        "n_fit_images": 8,
        "n_calibration_images": 2,
        "patches": 1000,
        "bank_size": 100,
        "feature_dim": 8,
        "backbone_load_s": 0.5,
        "features_s": 1.0,
        "coreset_s": 2.0,
        "index_s": 0.1,
        "calibration_s": 0.2,
        "total_s": 4.0,
        "total_cpu_s": 6.0,
        "peak_rss_mb": 200.0,
    }
    meta = {
        "data": "toy",
        "method": "patchcore",
        "backbone": "bb",
        "image_size": [64, 64],
        "coreset_ratio": 0.1,
        "index": "hnsw" if approx else "flat",
        "cpu": "cpu",
        "cpu_count": 2,
    }
    return {
        "meta": meta,
        "fit": fit,
        "score": score,
        "load_avg_before": [1.0, 1.0, 1.0],
        "load_avg_after": [2.0, 1.0, 1.0],
    }


def test_report_shows_the_numbers(bench):
    text = bench.format_report(_result(approx=False))
    assert "3.50 img/s" in text and "0.9876" in text and "crack" in text and "n/a" in text
    assert "approximate" not in text
    text = bench.format_report(_result(approx=True))
    assert "recall@1 0.9000 (same id), 0.9500 (same distance)" in text and "-0.0100" in text
    assert "3 of 10 changed" in text and "1.500x" in text
    assert "approximate 4.00 wall / 3.00 CPU / 2.00 best; exact 40.00 / 30.00 / 20.00" in text
