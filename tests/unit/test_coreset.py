"""Tests for workers.coreset: the pruned and batched greedy k-center selections are the textbook one."""

from __future__ import annotations

import pytest
import torch

from patchaudit.errors import ConfigError
from patchaudit.workers.coreset import coreset_size, greedy_coreset, kmeans_assign, random_projection


def clustered(n: int, d: int, seed: int, k: int = 25) -> torch.Tensor:
    """(n, d) float32: k Gaussian blobs of different spreads around random centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    which = torch.randint(k, (n,), generator=g)
    spread = torch.rand(k, generator=g) * 0.3 + 0.05
    return centres[which] + torch.randn(n, d, generator=g) * spread[which, None]


def min_dist_trace(z: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference, step by step: (distance of sel[i] to sel[:i], covering radius of sel[:i+1])."""
    z = z.double()
    mind = torch.full((z.shape[0],), float("inf"), dtype=torch.float64)
    picked, radius = [], []
    for j in sel.tolist():
        picked.append(mind[j])
        mind = torch.minimum(mind, (z - z[j]).norm(dim=1))
        radius.append(mind.max())
    return torch.stack(picked), torch.stack(radius)


def rounding_tol(z: torch.Tensor, radius: float) -> float:
    """float32 rounding of ||x||^2 - 2xc + ||c||^2 is ~eps * ||x||^2; as a distance, divided by ~2 * radius."""
    return 1e-6 * float(z.double().norm(dim=1).max() ** 2) / radius


def assert_greedy(z: torch.Tensor, sel: torch.Tensor) -> None:
    """Each pick is (within float32 rounding) the point farthest from everything picked before it."""
    picked, radius = min_dist_trace(z, sel)
    covering_before = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), radius[:-1]])
    tol = rounding_tol(z, float(radius[-1]))
    bad = (picked[1:] < covering_before[1:] - tol).nonzero()
    assert bad.numel() == 0, (
        f"step {int(bad[0]) + 1} picked a point {float(picked[int(bad[0]) + 1]):.7f} away, "
        f"while the covering radius was {float(covering_before[int(bad[0]) + 1]):.7f}"
    )


def assert_same_selection(
    x: torch.Tensor, fast: torch.Tensor, dense: torch.Tensor, proj: int | None, seed: int, method: str
) -> int | None:
    """`fast` equals `dense`, or they part only at a float32 tie and `fast` stays greedy after it.

    Where two candidates are equally far (within the rounding of ||x||^2 - 2xc + ||c||^2, whose summation
    order differs between matrix products and the dense loop's matrix-vector products, and between CPUs'
    BLAS kernels), either pick is right, and the selections differ from there on. Returns the first
    differing step, or None when equal.
    """
    if torch.equal(fast, dense):
        return None
    i = int((fast != dense).nonzero()[0])
    assert i > 0, f"{method} starts at {int(fast[0])}, dense at {int(dense[0])}: the seeded start must agree"
    z = random_projection(x, proj, seed).double()
    prefix = z[dense[:i]]
    d_dense = float(torch.cdist(z[dense[i]][None], prefix).min())
    d_fast = float(torch.cdist(z[fast[i]][None], prefix).min())
    assert abs(d_dense - d_fast) <= rounding_tol(z, d_dense), (
        f"step {i}: dense picked {int(dense[i])} at {d_dense:.7f}, {method} {int(fast[i])} at {d_fast:.7f}"
    )
    assert_greedy(z, fast)
    return i


# --------------------------------------------------------------------------- sizes and errors


@pytest.mark.parametrize(
    ("n", "ratio", "expected"),
    [(100, 0.1, 10), (100, 1.0, 100), (1000, 0.0001, 1), (10, 0.25, 2), (7, 0.5, 4), (1, 0.01, 1), (19_000, 0.1, 1900)],
)
def test_coreset_size(n, ratio, expected):
    assert coreset_size(n, ratio) == expected


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.0001, 2.0])
def test_coreset_size_bad_ratio(ratio):
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        coreset_size(100, ratio)


@pytest.mark.parametrize("n_select", [0, -1, 51])
def test_greedy_bad_size(n_select):
    with pytest.raises(ConfigError, match=r"\[1, 50\]"):
        greedy_coreset(clustered(50, 4, 0), n_select)


def test_greedy_bad_method():
    with pytest.raises(ConfigError, match="batched.*pruned.*dense"):
        greedy_coreset(clustered(50, 4, 0), 5, method="kcenter")


def test_random_projection():
    x = clustered(300, 256, 0)
    z = random_projection(x, 32, seed=1)
    assert z.shape == (300, 32) and z.dtype == torch.float32
    assert torch.equal(z, random_projection(x, 32, seed=1))  # deterministic per seed
    assert not torch.equal(z, random_projection(x, 32, seed=2))
    assert torch.equal(random_projection(x, None, 0), x)  # off
    assert torch.equal(random_projection(x, 256, 0), x)  # nothing to reduce
    # Johnson-Lindenstrauss: pairwise distances roughly kept (32 dims: within a factor ~2)
    ratio = torch.pdist(z[:60]) / torch.pdist(x[:60])
    assert 0.5 < float(ratio.median()) < 1.5 and float(ratio.min()) > 0.3


def test_kmeans_assign_partitions():
    x = clustered(2000, 8, 0, k=5)
    a = kmeans_assign(x, 12, seed=0)
    assert a.shape == (2000,) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 12


# --------------------------------------------------------------------------- pruned == batched == dense

FAST = ["pruned", "batched"]


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize(
    ("n", "d", "proj", "n_select"),
    [(300, 16, None, 90), (2000, 64, None, 200), (2000, 64, 32, 200), (3000, 200, 128, 300), (1500, 24, None, 450)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_equals_dense(n, d, proj, n_select, seed, method):
    # Selections up to ~30% of the points: deeper ones (and data far from the origin) reach covering
    # radii where float32 rounding of ||x||^2 - 2xc + ||c||^2 creates ties that either loop may break
    # differently; test_greedy_property checks those without needing equal tie-breaking.
    x = clustered(n, d, seed)
    dense = greedy_coreset(x, n_select, projection_dim=proj, seed=seed, method="dense")
    pruned = greedy_coreset(x, n_select, projection_dim=proj, seed=seed, method=method)
    assert dense.dtype == pruned.dtype == torch.long
    assert dense.shape == pruned.shape == (n_select,)
    assert_same_selection(x, pruned, dense, proj, seed, method)


def test_selection_check_rejects_a_wrong_pick():
    # The tie-tolerant comparison above still catches a pick that is not the farthest point.
    x = clustered(600, 8, 13)
    dense = greedy_coreset(x, 60, projection_dim=None, seed=13, method="dense")
    assert assert_same_selection(x, dense.clone(), dense, None, 13, "same") is None
    wrong = dense.clone()
    wrong[10], wrong[50] = dense[50], dense[10]  # a late (near) pick moved early: not a tie
    with pytest.raises(AssertionError, match="step 10"):
        assert_same_selection(x, wrong, dense, None, 13, "swapped")
    with pytest.raises(AssertionError, match="seeded start"):
        assert_same_selection(x, dense.roll(1), dense, None, 13, "rolled")


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("n_clusters", [1, 3, 40])
def test_fast_equals_dense_any_partition(n_clusters, method):
    # The pruning is exact for any grouping: one cluster, a few huge ones, many small ones.
    x = clustered(1200, 16, 4)
    dense = greedy_coreset(x, 150, projection_dim=None, seed=4, method="dense")
    pruned = greedy_coreset(x, 150, projection_dim=None, seed=4, method=method, n_clusters=n_clusters)
    assert_same_selection(x, pruned, dense, None, 4, method)


@pytest.mark.parametrize(("max_candidates", "sub_batch"), [(1, 1), (16, 3), (4096, 1000)])
def test_batched_equals_dense_any_batching(max_candidates, sub_batch):
    # One candidate per round degenerates to the plain loop; odd sub-batches split rounds unevenly.
    from patchaudit.workers.coreset import _greedy_batched

    x = clustered(1500, 16, 11)
    dense = greedy_coreset(x, 300, projection_dim=None, seed=11, method="dense")
    batched = _greedy_batched(x, 300, int(dense[0]), None, 11, max_candidates=max_candidates, sub_batch=sub_batch)
    assert_same_selection(x, batched, dense, None, 11, "batched")


def test_batched_with_duplicate_points():
    # Exact duplicates reach distance 0: still no index is picked twice, and n_select == n works.
    x = clustered(200, 8, 12)
    x = torch.cat([x, x[:50]])
    sel = greedy_coreset(x, 250, projection_dim=None, seed=0, method="batched")
    assert sorted(sel.tolist()) == list(range(250))


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_greedy_property(offset, method):
    # Independent of the dense loop: each pick is (within float32 rounding) the point farthest from
    # everything picked before it, so ties can never hide a wrong pick. Offset data (large norms,
    # where the ||x||^2 - 2xc + ||c||^2 expansion loses precision) included.
    x = clustered(2500, 32, 5) + offset
    assert_greedy(x, greedy_coreset(x, 400, projection_dim=None, seed=5, method=method))


def test_covering_radius_non_increasing_and_matches_dense():
    x = clustered(2000, 48, 6)
    pruned = greedy_coreset(x, 250, projection_dim=None, seed=6)
    dense = greedy_coreset(x, 250, projection_dim=None, seed=6, method="dense")
    _, r_pruned = min_dist_trace(x, pruned)
    _, r_dense = min_dist_trace(x, dense)
    assert torch.all(r_pruned[1:] <= r_pruned[:-1])
    # Up to a float32 tie (on another CPU) the radii are the same; after one the runs differ legitimately.
    split = assert_same_selection(x, pruned, dense, None, 6, "pruned") or len(dense)
    torch.testing.assert_close(r_pruned[:split], r_dense[:split], rtol=1e-6, atol=1e-9)
    # Greedy k-center shrinks the radius a lot on clustered data (25 blobs): far below the first one.
    assert float(r_pruned[-1]) < 0.2 * float(r_pruned[0])


@pytest.mark.parametrize("method", ["batched", "pruned", "dense"])
def test_no_duplicates_and_in_range(method):
    n = 800
    x = clustered(n, 12, 7)
    sel = greedy_coreset(x, 300, projection_dim=None, seed=7, method=method)
    assert len(set(sel.tolist())) == 300
    assert int(sel.min()) >= 0 and int(sel.max()) < n
    everything = greedy_coreset(x, n, projection_dim=None, seed=7, method=method)
    assert sorted(everything.tolist()) == list(range(n))  # n_select == n: a permutation


def test_seeded_start_and_determinism():
    x = clustered(1000, 16, 8)
    a = greedy_coreset(x, 50, seed=3)
    assert torch.equal(a, greedy_coreset(x, 50, seed=3))
    expected_start = int(torch.randint(1000, (1,), generator=torch.Generator().manual_seed(3)))
    assert int(a[0]) == expected_start
    assert int(greedy_coreset(x, 50, seed=3, method="dense")[0]) == expected_start
    assert not torch.equal(a, greedy_coreset(x, 50, seed=4))  # another seed, another start


def test_single_point_and_thread_setting_restored():
    threads = torch.get_num_threads()
    x = clustered(100, 8, 9)
    sel = greedy_coreset(x, 1, projection_dim=None, seed=0)
    assert sel.shape == (1,)
    assert torch.get_num_threads() == threads
