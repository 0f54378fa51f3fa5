"""benchmarks/run_costs.py: roles of a Ray process tree and CPU between two times of a sampled series."""

from __future__ import annotations

import os
import time

import pytest
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def rc():
    return load_benchmark("run_costs.py")


def test_roles_from_command_lines(rc):
    assert rc._role("ray::DecodeActor.decode", 1, 2) == "decode_actors"
    assert rc._role("ray::FeatureWorker.run", 1, 2) == "feature_worker"
    assert rc._role("/x/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/s", 1, 2) == "raylet"
    assert rc._role("/x/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/l", 1, 2) == "gcs"
    assert rc._role("ray::IDLE", 1, 2) == "other_ray"
    assert rc._role("python run.py", 7, 7) == "driver"


def test_cpu_between_interpolates_per_role(rc):
    series = [(0.0, {"a": 0.0}), (10.0, {"a": 5.0, "b": 2.0}), (20.0, {"a": 5.0, "b": 6.0})]
    got = rc.cpu_between(series, 5.0, 15.0)
    assert got["a"] == pytest.approx(2.5) and got["b"] == pytest.approx(3.0)  # b counted from 0 at the first sample


def test_role_cpu_counts_this_process(rc):
    sampler = rc.RoleCpu(interval=0.05).start()
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    totals = sampler.stop()
    assert totals["driver"] >= 0.1  # clock ticks of /proc: coarse, but at least half of what was spun
    assert sampler.series[-1][1]["driver"] == pytest.approx(totals["driver"])
    assert os.getpid() == sampler.driver
