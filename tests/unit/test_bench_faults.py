"""benchmarks/faults.py: how it counts a report (rows, duplicated and missing images)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("faults.py")


def _part(report: Path, name: str, uris: list[str]) -> None:
    (report / "parts").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_uri": uris}), report / "parts" / f"{name}.parquet")


def test_count_rows_duplicates_missing(bench, tmp_path: Path) -> None:
    _part(tmp_path, "b000000", ["file:///i/a.png", "file:///i/b.png"])
    _part(tmp_path, "b000001", ["file:///i/b.png", "file:///i/x.png"])
    listed = ["file:///i/a.png", "file:///i/b.png", "file:///i/c.png"]
    assert bench.count(tmp_path, listed) == {"rows": 4, "duplicates": 1, "missing": 1}


def test_count_of_an_empty_report(bench, tmp_path: Path) -> None:
    assert bench.count(tmp_path, ["file:///i/a.png"]) == {"rows": 0, "duplicates": 0, "missing": 1}
