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
    none = dict.fromkeys(tm.OVERHEADS_256, 0.0)
    rep = tm.h100_report(png_speedup=1.0, cpu_node_cores=16, target=1000, overheads=none)
    lite = rep["tf_efficientnet_lite0, slow host"]
    assert lite["worker_mode_img_s"] == pytest.approx(15 * 247.2 / 16)
    assert lite["cpu_nodes_for_1000"] == 4  # (15 + 16 N) * 15.45 >= 1000 -> N = 4
    assert rep["wide_resnet50_2, slow host"]["cpu_nodes_for_1000"] is None  # 518 img/s on the GPU
    # With the measured loop, hand-over and background (README: 1.76x fast PNG path): N = 2 still reaches 1,000.
    o = tm.OVERHEADS_256
    lite = tm.h100_report(png_speedup=1.76, cpu_node_cores=16, target=1000)["tf_efficientnet_lite0, slow host"]
    decode = 1000 / (247.2 / 16) / 1.76
    per_image = decode + o["transfer_out_ms"] + o["loop_ms"] + o["transfer_in_ms"]
    free, cpu_node = 15 - o["background_cores"], 16 - o["background_cores"]
    assert lite["worker_mode_img_s"] == pytest.approx(free * 1000 / (decode + o["loop_ms"]))
    assert lite["cluster_img_s_by_cpu_nodes"][2] == pytest.approx((free + 2 * cpu_node) * 1000 / per_image)
    assert lite["cpu_nodes_for_1000"] == 2
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


def test_loop_transfer_and_background_take_cores(tm):
    # 50 ms decode, 2 ms loop on the GPU node, 1 + 1 ms hand-over, 1 core of background per node.
    costs = tm.Costs(50.0, 1.0, loop_ms=2.0, transfer_out_ms=1.0, transfer_in_ms=1.0, background_cores=1.0)
    # One GPU node of 16: 16 - 1 reserved - 1 background = 14 cores for 54 ms of CPU per image.
    r = tm.predict(tm.Shape(1, 16, 0, 16), costs)
    assert r["images_per_s"] == pytest.approx(14 * 1000 / 54)
    # + 4 CPU nodes: (14 + 4 * 15) cores; the GPU node's loop (3 ms/img on 14 cores: 4,667/s) does not bind.
    assert tm.predict(tm.Shape(1, 16, 4, 16), costs)["decode_capacity"] == pytest.approx(74 * 1000 / 54)
    # Decode in the worker: no hand-over, the loop on the same cores as the decode.
    assert tm.predict(tm.Shape(1, 16, 0, 16), costs, mode="worker")["images_per_s"] == pytest.approx(14 * 1000 / 52)


def test_gpu_node_loop_caps_what_cpu_nodes_can_add(tm):
    # A 10 ms loop per image on a GPU node with 4 free cores: at most 400 img/s, however many CPU nodes.
    costs = tm.Costs(10.0, 0.1, loop_ms=10.0)
    shape = tm.Shape(1, 5, 0, 16)
    assert tm.predict(tm.Shape(1, 5, 100, 16), costs)["images_per_s"] == pytest.approx(400)
    assert tm.cpu_nodes_for(399, shape, costs) is not None
    assert tm.cpu_nodes_for(401, shape, costs) is None


def test_predict_shared_worker_shares_its_core_with_the_decoders(tm):
    # Two cores, two decoders (10 ms) and a worker (10 ms): while both decoders run the worker gets 2/3
    # of a core; they run u = rate * 10 / (2 * 2/3 * 1000) of the time; rate = 1000 / (10 + 10 * (1/3) / (4/3)).
    assert tm.predict_shared(2, 10.0, 10.0, 1.0, 2.0) == pytest.approx(1000 / 12.5)
    # One decoder: a core each, the worker's own ceiling.
    assert tm.predict_shared(1, 10.0, 10.0, 1.0, 2.0) == pytest.approx(100.0)
    # Background CPU comes off the cores all threads share.
    assert tm.predict_shared(1, 10.0, 10.0, 1.0, 2.0, background_cores=1.0) == pytest.approx(50.0)
    # More decoders than requests in flight: only `in_flight` of them decode at once.
    assert tm.predict_shared(4, 10.0, 10.0, 1.0, 5.0, in_flight=2) == pytest.approx(100.0)
