"""The argument and result plumbing of benchmarks/orchestration.py (the measured runs are not tests)."""

from __future__ import annotations

import pytest
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("orchestration.py")


def test_parse_sets_reads_yaml_scalars_of_the_run_section(bench):
    got = bench.parse_sets(["run.pipeline_depth=4", "run.heatmaps=false"])
    assert got == {"run": {"pipeline_depth": 4, "heatmaps": False}}
    for bad in ["pipeline_depth=4", "run.pipeline_depth", "model.batch_size=32", "run.=1"]:
        with pytest.raises(ValueError, match="run.KEY=VALUE"):
            bench.parse_sets([bad])


def test_parse_args_defaults_and_errors(bench, capsys):
    args = bench.parse_args([])
    assert args.files == 20000 and args.batch_sizes == [32, 256] and args.set == []
    for argv in (["--batch-sizes", "0"], ["--repeat", "0"], ["--set", "nope"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    assert "--set takes" in capsys.readouterr().err


def test_make_empty_files(bench, tmp_path):
    assert bench.make_empty_files(tmp_path / "in", 5) == 5
    files = sorted((tmp_path / "in").iterdir())
    assert [f.name for f in files][:2] == ["img_00000000.png", "img_00000001.png"] and len(files) == 5
    assert all(f.stat().st_size == 0 for f in files)
    with pytest.raises(ValueError, match="--files"):
        bench.make_empty_files(tmp_path / "x", 0)


def test_rates_and_table(bench):
    r = bench.rates(10000, 2.0, 4800.0)
    assert r == {"worker_rate": 5000.0, "steady_rate": 4800.0, "ms_per_image": pytest.approx(0.2)}
    assert bench.rates(10, None, None) == {"worker_rate": None, "steady_rate": None, "ms_per_image": None}
    run = {
        "batch_size": 32,
        "sets": {"run": {"pipeline_depth": 4}},
        "images": 10000,
        **r,
        "cpu_s": 12.5,
        "cpu_s_per_1k_steady": 0.4,
        "wall_s": 30.0,
        "load_before": [3.0, 2.0, 1.0],
    }
    table = bench.format_table([run, {**run, "sets": {}, "worker_rate": None, "ms_per_image": None}])
    lines = table.splitlines()
    assert len(lines) == 4 and "pipeline_depth=4" in lines[2] and "5000" in lines[2]
    assert "defaults" in lines[3] and "n/a" in lines[3]
