"""The pure part of benchmarks/coreset.py: agreement between two selections."""

from __future__ import annotations

import pytest
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("coreset.py")


def test_agreement(bench):
    assert bench.agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {"compared": 4, "same_set_share": 1.0, "identical_prefix": 4}
    # a swapped tie: same set, prefix stops at the swap
    assert bench.agreement([1, 2, 3, 4], [1, 3, 2, 4]) == {"compared": 4, "same_set_share": 1.0, "identical_prefix": 1}
    # a shorter run (the timed dense steps) is compared on its length
    assert bench.agreement([5, 6, 7, 8], [5, 6]) == {"compared": 2, "same_set_share": 1.0, "identical_prefix": 2}
    assert bench.agreement([1, 2], [3, 4])["same_set_share"] == 0.0
    assert bench.agreement([], []) == {"compared": 0, "same_set_share": 1.0, "identical_prefix": 0}
