"""benchmarks/calibration.py: the before/after thresholds and the realized rates it reports."""

from __future__ import annotations

import numpy as np
import pytest
from bench_scripts import load_benchmark

cal_bench = load_benchmark("calibration.py")


def test_threshold_rows_compare_the_held_out_quantile_with_the_conformal_statistic():
    cal = np.arange(20, dtype=float)  # 20 held-out scores: their 0.99 quantile is near the maximum
    oos = np.arange(200, dtype=float)  # 200 out-of-sample scores 0..199
    good = np.arange(100, dtype=float) * 2  # 0, 2, ..., 198
    (r1, r5) = cal_bench.threshold_rows(cal, oos, good, good, [0.01, 0.05])
    b, a = r1["before"], r1["after"]
    assert b["threshold"] == pytest.approx(np.quantile(cal, 0.99))
    assert b["flagged"] == 90 and b["realized"] == pytest.approx(0.9)  # 20, 22, ..., 198 are >= 18.81
    # after: the ceil(201 * 0.99) = 199th smallest of 0..199 is 198; 198 and 199 are at or above it
    assert a["threshold"] == 198.0 and a["attainable"]
    assert a["estimated"] == pytest.approx(2 / 200) and a["flagged"] == 1 and a["realized"] == pytest.approx(0.01)
    lo, hi = a["realized_ci95"]
    assert 0.0 < lo < 0.01 < hi < 0.06  # one of 100: an exact interval around 1%
    assert r5["after"]["threshold"] == 190.0  # ceil(201 * 0.95) = 191st smallest
    assert r5["after"]["flagged"] == 5 and r5["before"]["n_calibration"] == 20


def test_threshold_rows_say_when_the_target_cannot_be_vouched_for():
    (row,) = cal_bench.threshold_rows([1.0, 2.0], [1.0, 2.0, 3.0], [0.0, 5.0], [0.0, 5.0], [0.01])
    assert not row["after"]["attainable"] and row["after"]["threshold"] == 3.0  # the largest score
    assert row["after"]["flagged"] == 1 and row["after"]["realized"] == 0.5
    assert row["after"]["realized_ci95"][0] > 0.0 and row["after"]["realized_ci95"][1] < 1.0
