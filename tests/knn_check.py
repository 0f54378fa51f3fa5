"""Tie-tolerant comparison of k-NN results, for tests (import: `from knn_check import ...`; pytest puts
this folder on sys.path because tests/conftest.py lives here).

Two correct exact searches may disagree on ids wherever distances are (nearly) equal: a GEMM does not
promise the same rounding for every output column, so equal distances differ by an ulp one way on one
CPU and the other way on another (AMD vs Intel BLAS kernels, chunking, thread counts). The comparison
here, in the spirit of faiss `contrib.evaluation.check_ref_knn_with_draws`:

- distances: equal within `rtol * |d| + atol`, position by position (both rows sorted ascending);
- ids: per row, the positions are cut into groups of near-equal reference distances (consecutive
  sorted distances within the tolerance chain into one group); each group must hold the same SET of
  ids in both results;
- the last group of a row may continue past column k, so either result may have kept other members
  of the tie. With `all_d` (the true distance of every query to every bank vector) that group is
  checked by distance instead: each returned id must really lie at the distance reported for it.
  Without `all_d` the last group is compared as a set too (strict: pass `all_d` where a tie at the
  k-th neighbour is possible).

With `all_d`, every returned id of the new result is checked that way (not only the last group), so a
wrong id is caught even inside a tie group of the reference.
"""

from __future__ import annotations

import numpy as np

KnnResult = tuple[np.ndarray, np.ndarray]  # (squared distances (M, k), ids (M, k)), nearest first


def sq_l2(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Squared L2 distance of every query to every bank vector (M, N), in float64: the expansion
    ||q||^2 - 2 q.b + ||b||^2 loses ~1e-16 * ||q||^2 there, far below float32 rounding."""
    q, b = np.asarray(queries, np.float64), np.asarray(bank, np.float64)
    return np.maximum((q * q).sum(1)[:, None] - 2 * q @ b.T + (b * b).sum(1)[None, :], 0.0)


def recall_at_1(
    ids: np.ndarray, d: np.ndarray, exact_ids: np.ndarray, exact_d: np.ndarray, rtol: float = 1e-5, atol: float = 1e-5
) -> float:
    """Share of queries whose first neighbour is the exact one, or another at the same distance (a tie).
    ids, d, exact_ids, exact_d: (M, >=1), nearest first."""
    same_id = ids[:, 0] == exact_ids[:, 0]
    same_d = np.abs(d[:, 0] - exact_d[:, 0]) <= rtol * np.abs(exact_d[:, 0]) + atol
    return float((same_id | same_d).mean())


def tie_groups(d: np.ndarray, tol: float) -> list[slice]:
    """Slices of the sorted row `d` whose consecutive values are within `tol` of each other."""
    cuts = np.flatnonzero(np.diff(d) > tol) + 1  # a gap wider than tol starts a new group
    bounds = [0, *cuts.tolist(), len(d)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def assert_knn_equivalent(
    ref: KnnResult,
    new: KnnResult,
    *,
    all_d: np.ndarray | None = None,
    id_offset: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> None:
    """Raise AssertionError unless `new` is a correct answer wherever `ref` is, up to ties.

    ref, new: (distances (M, k), ids (M, k)), each row sorted by distance. all_d: (M, N) true distances
    (e.g. `sq_l2(queries, bank)`); ids index its columns after subtracting `id_offset`.
    """
    d_ref, i_ref = (np.asarray(a) for a in ref)
    d_new, i_new = (np.asarray(a) for a in new)
    assert d_ref.shape == i_ref.shape == d_new.shape == i_new.shape, (
        f"shapes differ: ref {d_ref.shape}/{i_ref.shape}, new {d_new.shape}/{i_new.shape}"
    )
    np.testing.assert_allclose(d_new, d_ref, rtol=rtol, atol=atol, err_msg="k-NN distances differ")
    for row in range(d_ref.shape[0]):
        ids = i_new[row]
        assert len(set(ids.tolist())) == len(ids), f"row {row}: an id is returned twice: {ids}"
        tol = rtol * float(np.abs(d_ref[row]).max(initial=0.0)) + atol
        groups = tie_groups(d_ref[row].astype(np.float64), tol)
        if all_d is not None:
            local = ids - id_offset
            assert np.all((local >= 0) & (local < all_d.shape[1])), f"row {row}: ids out of range: {ids}"
            true = all_d[row, local]
            bad = np.flatnonzero(np.abs(true - d_new[row]) > rtol * np.abs(true) + atol)
            assert bad.size == 0, (
                f"row {row}: ids {ids[bad]} are reported at distances {d_new[row, bad]} but lie at {true[bad]}"
            )
            groups = groups[:-1]  # the last group may be cut at k: checked by distance above
        for g in groups:
            got, want = set(i_new[row, g].tolist()), set(i_ref[row, g].tolist())
            assert got == want, (
                f"row {row}, neighbours {g.start}..{g.stop - 1} (distances {d_ref[row, g]}): "
                f"ids {sorted(got)} where {sorted(want)} were expected"
            )
