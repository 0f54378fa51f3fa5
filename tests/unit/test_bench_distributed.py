"""The pure parts of benchmarks/distributed.py: steady-state throughput, overhead, input folder, table."""

from __future__ import annotations

import os
import sys

import pytest
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("distributed.py")


def test_steady_throughput_drops_each_workers_first_part(bench):
    # worker a: parts at t=10 (warm-up), 12, 14 of 8 images -> 16 images in 4 s; worker b: 4 images / 2 s
    parts = [("a", 14.0, 8), ("a", 10.0, 8), ("b", 11.0, 8), ("a", 12.0, 8), ("b", 13.0, 4)]
    r = bench.steady_throughput(parts)
    assert r["per_worker"] == {"a": pytest.approx(4.0), "b": pytest.approx(2.0)}
    assert r["images_per_s"] == pytest.approx(6.0)
    assert r["workers_seen"] == 2


def test_steady_throughput_needs_two_parts(bench):
    r = bench.steady_throughput([("a", 1.0, 8)])
    assert r["images_per_s"] is None and r["per_worker"] == {}


def test_overhead(bench):
    assert bench.overhead(8.5, 10.0) == pytest.approx(0.15)
    assert bench.overhead(12.0, 10.0) == pytest.approx(-0.2)  # faster than single process
    assert bench.overhead(None, 10.0) is None and bench.overhead(5.0, None) is None


def test_repeat_images_links_every_image_repeat_times(bench, tmp_path):
    src = tmp_path / "test"
    for sub in ("good", "crack"):
        (src / sub).mkdir(parents=True)
        (src / sub / "000.png").write_bytes(sub.encode())
    (src / "good" / "notes.txt").write_text("not an image")
    n = bench.repeat_images(src, tmp_path / "out", 3)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert n == 6 and len(names) == 6
    assert "r2_crack_000.png" in names and "r0_good_000.png" in names
    assert (tmp_path / "out" / "r1_good_000.png").read_bytes() == b"good"
    assert not any(os.path.islink(tmp_path / "out" / x) for x in names)  # the file store refuses symlinks


def test_repeat_images_errors(bench, tmp_path):
    with pytest.raises(ValueError, match="repeat"):
        bench.repeat_images(tmp_path, tmp_path / "o", 0)
    with pytest.raises(FileNotFoundError, match="no images"):
        bench.repeat_images(tmp_path, tmp_path / "o", 1)


def test_format_table_has_a_row_per_run(bench):
    run = {
        "mode": "dist",
        "workers": 2,
        "heatmaps": True,
        "images": 249,
        "steady": {"images_per_s": 7.5},
        "throughput": {"excl_ray_init": 6.0, "incl_startup": 5.0},
        "ray_init_s": 3.2,
        "first_part_s": 9.0,
        "stages": {"decode_ms": 20.0, "feature_ms": 60.0, "knn_ms": 30.0},
        "overhead": 0.1,
        "cpu": {"steady_s_per_image": 0.25},
        "cpu_overhead": 0.05,
        "load_before": [0.5, 0.4, 0.3],
    }
    single = dict(run, mode="single", workers=1, ray_init_s=None, overhead=None, cpu_overhead=None)
    lines = bench.format_table([single, run]).splitlines()
    assert len(lines) == 4
    assert lines[3].split()[:4] == ["dist", "2", "on", "249"] and "+10.0%" in lines[3]
    assert lines[3].split()[-3:-1] == ["250", "+5.0%"]
    assert "n/a" in lines[2]


def test_cpu_between_interpolates(bench):
    series = [(0.0, 0.0), (1.0, 2.0), (3.0, 3.0)]
    assert bench.cpu_between(series, 0.5, 2.0) == pytest.approx(2.5 - 1.0)
    assert bench.cpu_between(series, -1.0, 5.0) == pytest.approx(3.0)  # clamped to the series
    assert bench.cpu_between(series[:1], 0.0, 1.0) is None


def test_cpu_sampler_counts_a_busy_child(bench):
    import subprocess

    sampler = bench.CpuSampler(interval=0.05).start()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    subprocess.run([sys.executable, "-c", busy], check=True)
    series = sampler.stop()
    if not series:
        pytest.skip("no /proc on this OS")
    assert series[-1][1] >= 0.3  # the child's CPU time is counted although it is not this process


def test_max_score_diff(bench):
    assert bench.max_score_diff({"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 2.0}) == pytest.approx(0.5)
    assert bench.max_score_diff({"a": 1.0}, {"b": 1.0}) is None  # different images: not comparable
    assert bench.max_score_diff({}, {}) is None
