"""benchmarks/throughput_model.py: the model's arithmetic, the shape search and the H100 report."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def tm():
    return load_benchmark("throughput_model.py")


def test_cluster_rate_is_the_smaller_of_decode_and_features(tm):
    costs = tm.Costs(decode_ms_per_core=50.0, feature_ms_per_gpu=1.0)  # 20 img/s per core, 1000 per GPU
    r = tm.predict(tm.Shape(1, 16, 0, 16), costs)
    assert r["images_per_s"] == pytest.approx(15 * 20)  # 15 free cores on the GPU node
    assert r["bottleneck"].startswith("decode")
    r = tm.predict(tm.Shape(1, 16, 4, 16), costs)  # + 64 cores: 79 * 20 = 1580 > 1000
    assert r["images_per_s"] == pytest.approx(1000) and r["bottleneck"].startswith("features")
    assert r["gpu_utilisation"] == pytest.approx(1.0)


def test_worker_mode_uses_only_the_gpu_nodes_cores(tm):
    costs = tm.Costs(50.0, 1.0)
    worker = tm.predict(tm.Shape(2, 16, 8, 16), costs, mode="worker")
    assert worker["images_per_s"] == pytest.approx(2 * 15 * 20)
    with pytest.raises(ValueError):
        tm.predict(tm.Shape(1, 16, 0, 16), costs, mode="other")


def test_cost_per_million(tm):
    prices = tm.Prices(gpu_node_hour=3.6, cpu_core_hour=0.0)
    r = tm.predict(tm.Shape(1, 16, 0, 16), tm.Costs(1.0, 1.0), prices)  # 1000 img/s (features)
    assert r["usd_per_million"] == pytest.approx(3.6 / 3600 / 1000 * 1e6)  # $1 per million


def test_cpu_nodes_for_target(tm):
    costs = tm.Costs(50.0, 1.0)
    base = tm.Shape(1, 16, 0, 16)
    assert tm.cpu_nodes_for(300, base, costs) == 0
    assert tm.cpu_nodes_for(1000, base, costs) == 3  # (15 + 3 * 16) * 20 = 1260 >= 1000; 2 nodes give 940
    assert tm.cpu_nodes_for(1001, base, costs) is None  # one GPU cannot: more CPU nodes do not help
    s = tm.shape_for(2500, costs, 16, 16)
    assert s["shape"]["gpu_nodes"] == 3 and s["images_per_s"] >= 2500


def test_h100_report_and_cli(tm, tmp_path):
    rep = tm.h100_report(png_speedup=1.0, cpu_node_cores=16, target=1000)
    lite = rep["tf_efficientnet_lite0, slow host"]
    assert lite["worker_mode_img_s"] == pytest.approx(15 * 247.2 / 16)
    assert lite["cpu_nodes_for_1000"] == 4  # (15 + 16 N) * 15.45 >= 1000 -> N = 4
    assert rep["wide_resnet50_2, slow host"]["cpu_nodes_for_1000"] is None  # 518 img/s on the GPU
    out = tmp_path / "tm.json"
    assert tm.main(["--shape", "1", "16", "2", "16", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["cluster"]["images_per_s"] > 0


def test_predict_shared_stage_and_core_limits(tm):
    # An idle 2-core machine: one decode process (20 ms) and one feature worker (50 ms): features bound.
    assert tm.predict_shared(1, 20.0, 50.0, one_thread=1.0, all_threads=2.0) == pytest.approx(20.0)
    # Decode bound with a slow decoder; a second decoder lifts it until the two cores are full.
    assert tm.predict_shared(1, 100.0, 50.0, 1.0, 2.0) == pytest.approx(10.0)
    assert tm.predict_shared(2, 100.0, 50.0, 1.0, 2.0) == pytest.approx(2000 / 150)  # 3 threads on 2 cores
    # A shared machine: each thread gets a tenth of a core, so every ceiling is a tenth.
    assert tm.predict_shared(1, 20.0, 50.0, 0.1, 0.2) == pytest.approx(2.0)


def test_share_probe_counts_cores(tm):
    got = tm.share_probe(1, seconds=0.3)
    assert 0.0 < got <= 1.05
