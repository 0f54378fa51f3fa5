"""The pure parts of benchmarks/near_duplicates.py: shot numbers, the grouped split, the filtered copy."""

from __future__ import annotations

import pytest
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("near_duplicates.py")


def test_shot_number(bench):
    assert bench.shot_number("exp3_num_120931.jpg") == 120931
    assert bench.shot_number("good/exp1_num_7.jpg") == 7
    assert bench.shot_number("000.png") is None


def test_near_duplicates_window_is_inclusive_and_ignores_exp(bench):
    train = ["exp1_num_100.jpg", "exp2_num_150.jpg", "exp3_num_151.jpg", "exp4_num_400.jpg", "other.jpg"]
    test = ["good/exp6_num_100.jpg", "crack/exp1_num_200.jpg"]
    # 150 is 50 from both test shots, 151 is 49 from 200 (another exp: still the same tile)
    assert bench.near_duplicates(train, test, 50) == {"exp1_num_100.jpg", "exp2_num_150.jpg", "exp3_num_151.jpg"}
    assert bench.near_duplicates(train, test, 49) == {"exp1_num_100.jpg", "exp3_num_151.jpg"}
    assert bench.near_duplicates(train, test, 0) == {"exp1_num_100.jpg"}
    assert bench.near_duplicates(train, ["a.png"], 1000) == set()
    with pytest.raises(ValueError):
        bench.near_duplicates(train, test, -1)


def test_gap_to_train(bench):
    train = ["exp1_num_100.jpg", "exp1_num_300.jpg"]
    test = ["x/exp2_num_90.jpg", "exp2_num_250.jpg", "exp2_num_999.jpg", "n.png"]
    assert bench.gap_to_train(train, test) == [10, 50, 699]


def test_filtered_copy_drops_only_train_good(bench, tmp_path):
    src = tmp_path / "src"
    for rel in [
        "train/good/exp1_num_1.jpg",
        "train/good/exp1_num_2.jpg",
        "test/good/exp1_num_1.jpg",
        "ground_truth/crack/exp1_num_9_mask.png",
    ]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    n = bench.filtered_copy(src, tmp_path / "dst", {"exp1_num_1.jpg"})
    assert n == 3
    got = sorted(str(p.relative_to(tmp_path / "dst")) for p in (tmp_path / "dst").rglob("*") if p.is_file())
    assert got == ["ground_truth/crack/exp1_num_9_mask.png", "test/good/exp1_num_1.jpg", "train/good/exp1_num_2.jpg"]
    assert (tmp_path / "dst" / "test/good/exp1_num_1.jpg").read_bytes() == b"test/good/exp1_num_1.jpg"
