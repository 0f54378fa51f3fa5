"""The tie-tolerant k-NN comparison of tests/knn_check.py: it accepts reordered ties and nothing wrong."""

from __future__ import annotations

import numpy as np
import pytest
from knn_check import assert_knn_equivalent, sq_l2, tie_groups

# One query at the origin; bank vectors at squared distances 1, 4, 4, 4, 9, 16, 16 (ids 0..6).
BANK = np.array([[1, 0], [2, 0], [0, 2], [-2, 0], [3, 0], [4, 0], [0, 4]], dtype=np.float32)
ALL_D = sq_l2(np.zeros((1, 2), np.float32), BANK)  # (1, 7)


def res(d, i):
    return np.array([d], np.float32), np.array([i], np.int64)


REF = res([1, 4, 4, 4, 9, 16], [0, 1, 2, 3, 4, 5])


def test_tie_groups_chain_near_equal_values():
    assert tie_groups(np.array([1.0, 4.0, 4.0 + 1e-7, 4.0, 9.0]), 1e-6) == [slice(0, 1), slice(1, 4), slice(4, 5)]
    assert tie_groups(np.array([1.0]), 1e-6) == [slice(0, 1)]


def test_sq_l2_is_exact_in_float64():
    np.testing.assert_array_equal(ALL_D[0], [1, 4, 4, 4, 9, 16, 16])


@pytest.mark.parametrize("all_d", [None, ALL_D], ids=["ids-only", "with-distances"])
def test_accepts_identical_and_permuted_ties(all_d):
    assert_knn_equivalent(REF, REF, all_d=all_d)
    assert_knn_equivalent(REF, res([1, 4, 4, 4, 9, 16], [0, 3, 1, 2, 4, 5]), all_d=all_d)
    # Distances an ulp apart are still a tie (what a GEMM does to equal columns).
    assert_knn_equivalent(REF, res([1, 4, np.nextafter(np.float32(4), 5), 4, 9, 16], [0, 2, 3, 1, 4, 5]), all_d=all_d)


def test_accepts_another_member_of_a_tie_cut_at_k_given_the_distances():
    # k=6 cuts the tie {5, 6} at distance 16: id 6 is as right as id 5.
    other = res([1, 4, 4, 4, 9, 16], [0, 1, 2, 3, 4, 6])
    assert_knn_equivalent(REF, other, all_d=ALL_D)
    with pytest.raises(AssertionError, match="ids \\[6\\] where \\[5\\]"):
        assert_knn_equivalent(REF, other)  # without the distances it cannot know 6 is tied: strict
    # k=1 among duplicates: any of them.
    dup_d = np.zeros((1, 4))
    assert_knn_equivalent(res([0], [0]), res([0], [3]), all_d=dup_d)


@pytest.mark.parametrize("all_d", [None, ALL_D], ids=["ids-only", "with-distances"])
def test_rejects_a_wrong_id_inside_a_group(all_d):
    wrong = res([1, 4, 4, 4, 9, 16], [0, 1, 2, 4, 3, 5])  # 4 and 3 swapped across groups
    with pytest.raises(AssertionError):
        assert_knn_equivalent(REF, wrong, all_d=all_d)


def test_rejects_a_wrong_id_in_the_last_group_and_a_lie_about_distances():
    with pytest.raises(AssertionError, match="lie at"):
        assert_knn_equivalent(res([1, 4, 4, 4, 9], [0, 1, 2, 3, 4]), res([1, 4, 4, 4, 9], [0, 1, 2, 3, 5]), all_d=ALL_D)
    with pytest.raises(AssertionError, match="lie at"):  # k=1: the nearest is 0, not 4
        assert_knn_equivalent(res([1], [0]), res([1], [4]), all_d=ALL_D)
    with pytest.raises(AssertionError, match="returned twice"):
        assert_knn_equivalent(REF, res([1, 4, 4, 4, 9, 16], [0, 1, 1, 3, 4, 5]))
    with pytest.raises(AssertionError, match="out of range"):
        assert_knn_equivalent(REF, res([1, 4, 4, 4, 9, 16], [0, 1, 2, 3, 4, 7]), all_d=ALL_D)


def test_rejects_wrong_distances_and_shapes():
    with pytest.raises(AssertionError, match="distances differ"):
        assert_knn_equivalent(REF, res([1, 4, 4, 4, 9, 17], [0, 1, 2, 3, 4, 5]))
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_knn_equivalent(REF, res([1, 4, 4], [0, 1, 2]))


def test_id_offset_maps_global_ids_to_columns():
    shifted = (REF[0], REF[1] + 100)
    assert_knn_equivalent(shifted, shifted, all_d=ALL_D, id_offset=100)
    with pytest.raises(AssertionError, match="out of range"):
        assert_knn_equivalent(shifted, shifted, all_d=ALL_D)
