"""Tests for workers.knn: "ask every shard, merge" equals one flat index; serialisation; approximate recall.

Search results are compared tie-tolerantly (knn_check.assert_knn_equivalent): a GEMM rounds equal
distances differently per output column, so which of two (nearly) tied ids comes back depends on the
CPU's BLAS kernels, the chunking and the thread count; only the set of tied ids and their distances are
promised. Exact equality stays for stored vectors and for merge_topk's copies of given distances.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from knn_check import assert_knn_equivalent, recall_at_1, sq_l2

from patchaudit.errors import ConfigError
from patchaudit.workers.knn import (
    FaissShard,
    IndexSpec,
    ShardedIndex,
    TorchShard,
    build_shards,
    default_nlist,
    merge_topk,
    split_ranges,
)


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # These indexes are tiny: OpenMP threads only add barrier spinning, which on a busy 2-core machine
    # makes the file several times slower. Restored afterwards (the setting is process-wide).
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int, seed: int, k: int = 20) -> np.ndarray:
    """(n, d) float32 Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    return (centres[rng.integers(k, size=n)] + rng.normal(size=(n, d)) * 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def bank() -> np.ndarray:
    return clustered(3300, 32, seed=0)[:3000]  # (3000, 32)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(3300, 32, seed=0)[3000:]  # (300, 32): same blobs, not in the bank


@pytest.fixture(scope="module")
def all_d(bank, queries) -> np.ndarray:
    """(300, 3000) float64 squared distances of every query to every bank vector."""
    return sq_l2(queries, bank)


def brute_force(all_d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 exact k-NN from the full distance matrix: (squared L2 (M, k), ids (M, k))."""
    ids = np.argsort(all_d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_d, ids, 1), ids


# --------------------------------------------------------------------------- split_ranges


@pytest.mark.parametrize("n", [1, 2, 5, 7, 10, 31, 100, 1001])
def test_split_ranges_cover_without_overlap(n):
    for shards in range(1, min(n, 12) + 1):
        ranges = split_ranges(n, shards)
        assert len(ranges) == shards
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        for (_, b0), (a1, _) in zip(ranges, ranges[1:]):
            assert b0 == a1  # contiguous: no gap, no overlap
        sizes = [b - a for a, b in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert all(isinstance(v, int) for r in ranges for v in r)


@pytest.mark.parametrize(("n", "shards"), [(10, 0), (10, -2), (3, 4), (0, 1)])
def test_split_ranges_bad_counts(n, shards):
    with pytest.raises(ConfigError, match="shard"):
        split_ranges(n, shards)


# --------------------------------------------------------------------------- merge_topk


def test_merge_topk_against_brute_force():
    rng = np.random.default_rng(3)
    m, sizes = 50, [40, 17, 1, 33]  # per-shard vector counts
    offsets = np.cumsum([0] + sizes[:-1])
    all_d = rng.random((m, sum(sizes))).astype(np.float32)  # distance of query row to every global id
    for k in (1, 4, 10):
        results = []
        for off, size in zip(offsets, sizes):
            kk = min(k, size)  # a shard smaller than k returns fewer columns
            local = np.argsort(all_d[:, off : off + size], axis=1)[:, :kk]
            results.append((np.take_along_axis(all_d[:, off : off + size], local, 1), local + off))
        d, ids = merge_topk(results, k)
        ref_ids = np.argsort(all_d, axis=1, kind="stable")[:, :k]
        assert d.shape == ids.shape == (m, k)
        # merge_topk copies the given distances: exact, and any tie between equal ones is fine.
        assert_knn_equivalent(
            (np.take_along_axis(all_d, ref_ids, 1), ref_ids), (d, ids), all_d=all_d, rtol=0.0, atol=0.0
        )
        assert np.all(np.diff(d, axis=1) >= 0)  # sorted ascending


def test_merge_topk_exact_width_and_ties():
    # Total columns == k takes the full-sort path; equal distances keep shard order (stable).
    a = (np.array([[1.0, 3.0]], np.float32), np.array([[0, 1]]))
    b = (np.array([[1.0, 2.0]], np.float32), np.array([[5, 6]]))
    d, ids = merge_topk([a, b], 4)
    np.testing.assert_array_equal(d, [[1.0, 1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(ids, [[0, 5, 6, 1]])
    d, ids = merge_topk([a, b], 2)
    np.testing.assert_array_equal(d, [[1.0, 1.0]])
    assert set(ids[0]) == {0, 5}


def test_merge_topk_needs_results():
    with pytest.raises(ValueError):
        merge_topk([], 1)


# --------------------------------------------------------------------------- sharded == flat


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("n_shards", [2, 3, 5])
@pytest.mark.parametrize("k", [1, 4])
def test_sharded_equals_flat(bank, queries, all_d, backend, n_shards, k):
    flat = ShardedIndex(build_shards(bank, 1, backend=backend))
    sharded = ShardedIndex(build_shards(bank, n_shards, backend=backend))
    assert sharded.ntotal == flat.ntotal == len(bank)
    assert [s.offset for s in sharded.shards] == [a for a, _ in split_ranges(len(bank), n_shards)]
    d_flat, i_flat = flat.search(queries, k)
    d_sh, i_sh = sharded.search(queries, k)
    assert d_sh.shape == i_sh.shape == (len(queries), k)
    assert d_sh.dtype == np.float32 and i_sh.dtype == np.int64
    assert_knn_equivalent((d_flat, i_flat), (d_sh, i_sh), all_d=all_d)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_flat_is_exact(bank, queries, all_d, backend):
    d, i = ShardedIndex(build_shards(bank, 3, backend=backend)).search(queries, 4)
    assert_knn_equivalent(brute_force(all_d, 4), (d, i), all_d=all_d)


def test_torch_chunked_search_equals_unchunked(bank, queries, all_d):
    whole = TorchShard(bank, offset=7)
    chunked = TorchShard(bank, offset=7, chunk=128)  # many chunks, last one partial
    d0, i0 = whole.search(queries, 5)
    d1, i1 = chunked.search(queries, 5)
    assert_knn_equivalent((d0, i0), (d1, i1), all_d=all_d, id_offset=7)
    assert i0.min() >= 7  # global ids carry the offset


@pytest.mark.parametrize(
    "chunk,query_block,prefilter",
    [
        (128, 100, "fp32"),
        (1000, 7, "fp32"),
        (100000, 100000, "fp32"),
        (333, 1, "fp32"),
        (50, 64, "fp32"),
        (128, 100, "bf16"),
        (1000, 7, "bf16"),
        (100000, 100000, "bf16"),
        (50, 150, "bf16"),
    ],
)
def test_torch_blocked_1nn_equals_brute_force(bank, queries, all_d, chunk, query_block, prefilter):
    """The k=1 path (cell minima, then exact search of the kept cells), over query blocks and bank chunks
    with partial last ones, with either prefilter type."""
    d_ref, i_ref = brute_force(all_d, 1)
    shard = TorchShard(bank, offset=3, chunk=chunk, query_block=query_block, prefilter=prefilter)
    d, i = shard.search(queries, 1)
    assert_knn_equivalent((d_ref, i_ref + 3), (d, i), all_d=all_d, id_offset=3)


def test_torch_blocked_search_edge_cases(bank, queries):
    shard = TorchShard(bank[:5], chunk=2, query_block=3)
    d, i = shard.search(queries[:0], 1)
    assert d.shape == i.shape == (0, 1)
    d, i = shard.search(queries[:4], 9)  # k above the shard's size: every vector, nearest first
    assert d.shape == i.shape == (4, 5)
    assert np.all(np.diff(d, axis=1) >= 0) and all(sorted(row) == list(range(5)) for row in i)
    # Exact ties (4 copies of one vector, over two chunks): any copy may win (the GEMM may round the
    # copies' distances an ulp apart), but its reported distance is exact.
    dup = TorchShard(np.repeat(bank[:1], 4, axis=0), chunk=2)
    d, i = dup.search(bank[:1], 1)
    assert 0 <= i[0, 0] < 4 and d[0, 0] == 0.0
    d, i = dup.search(bank[:1], 4)
    assert sorted(i[0].tolist()) == [0, 1, 2, 3] and np.all(d == 0.0)
    np.testing.assert_array_equal(shard.vectors(), bank[:5])  # as FaissShard.vectors(): a copy, in id order
    shard.vectors()[0] = -1
    np.testing.assert_array_equal(shard.vectors(), bank[:5])


def test_self_query_finds_itself(bank):
    # Exact ids are safe here: each query is a bank vector at distance 0, the next nearest is units away.
    for backend in ("faiss", "torch"):
        d, i = ShardedIndex(build_shards(bank, 4, backend=backend)).search(bank[::50], 1)
        np.testing.assert_array_equal(i[:, 0], np.arange(0, len(bank), 50))
        np.testing.assert_allclose(d[:, 0], 0.0, atol=1e-3)
        assert np.all(d >= 0)


def test_bad_backend_and_index_type(bank):
    with pytest.raises(ConfigError, match="faiss, torch"):
        build_shards(bank, 2, backend="annoy")
    with pytest.raises(ConfigError, match="flat, hnsw, ivf"):
        IndexSpec(index_type="pq")


# --------------------------------------------------------------------------- serialisation


def test_faiss_shard_bytes_round_trip(bank, queries, all_d):
    shard = FaissShard.build(bank[1000:2000], offset=1000)
    back = FaissShard.from_bytes(shard.to_bytes(), offset=1000)
    assert back.ntotal == 1000 and back.offset == 1000
    d0, i0 = shard.search(queries, 3)
    d1, i1 = back.search(queries, 3)
    # The same vectors (checked exactly below); the search itself may break ties another way (BLAS
    # blocking can depend on buffer alignment).
    assert_knn_equivalent((d0, i0), (d1, i1), all_d=all_d[:, 1000:2000], id_offset=1000)
    assert i0.min() >= 1000 and i0.max() < 2000
    np.testing.assert_array_equal(back.vectors(), bank[1000:2000])


# --------------------------------------------------------------------------- approximate indexes


@pytest.mark.parametrize(
    "spec",
    [IndexSpec(index_type="hnsw", hnsw_m=16, hnsw_ef_search=64), IndexSpec(index_type="ivf", ivf_nprobe=8)],
    ids=["hnsw", "ivf"],
)
@pytest.mark.parametrize("n_shards", [1, 3])
def test_approximate_recall(bank, queries, spec, n_shards):
    exact_d, exact = ShardedIndex(build_shards(bank, 1)).search(queries, 1)
    approx_shards = build_shards(bank, n_shards, spec=spec)
    d, ids = ShardedIndex(approx_shards).search(queries, 1)
    recall = recall_at_1(ids, d, exact, exact_d)  # a tied neighbour counts as found
    assert recall > 0.9, f"{spec.index_type} recall@1 {recall:.3f} on {n_shards} shard(s)"
    assert ids.min() >= 0 and ids.max() < len(bank)
    # Whatever an approximate index returns, its distance must be the true distance to that id.
    true_d = ((queries - bank[ids[:, 0]]) ** 2).sum(1)
    np.testing.assert_allclose(d[:, 0], true_d, rtol=1e-4, atol=1e-4)
    for shard in approx_shards:  # the search-time knobs reach faiss
        if spec.index_type == "hnsw":
            assert shard.index.hnsw.efSearch == spec.hnsw_ef_search
        else:
            assert shard.index.nprobe == spec.ivf_nprobe
            assert shard.index.nlist == default_nlist(shard.ntotal)  # the ivf_nlist=0 default
    # And the shard's stored vectors are the bank slice (reconstruct path used by artifact export).
    first = approx_shards[0]
    np.testing.assert_array_equal(first.vectors(), bank[: first.ntotal])  # in id order, exactly


def test_ivf_nprobe_is_applied(bank, queries):
    # A guard that the recall test can fail: probing one list of many is measurably worse.
    exact_d, exact = ShardedIndex(build_shards(bank, 1)).search(queries, 1)
    good = build_shards(bank, 1, spec=IndexSpec(index_type="ivf", ivf_nlist=64, ivf_nprobe=64))
    bad = build_shards(bank, 1, spec=IndexSpec(index_type="ivf", ivf_nlist=64, ivf_nprobe=1))
    assert good[0].index.nprobe == 64 and bad[0].index.nprobe == 1
    r_good = recall_at_1(*ShardedIndex(good).search(queries, 1)[::-1], exact, exact_d)
    r_bad = recall_at_1(*ShardedIndex(bad).search(queries, 1)[::-1], exact, exact_d)
    assert r_good == 1.0 and r_bad < r_good  # probing every list is exact (up to ties)


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (38, 1), (390, 10), (19_251, 493), (1_000_000, 4000)])
def test_default_nlist_keeps_39_points_per_list(n, expected):
    assert default_nlist(n) == expected


def test_coherent_order_is_a_permutation_of_near_runs(bank):
    from patchaudit.workers.knn import coherent_order

    x = torch.from_numpy(bank)
    order = coherent_order(x, 128)
    assert sorted(order.tolist()) == list(range(len(bank)))
    assert torch.equal(order, coherent_order(x, 128))  # deterministic

    # runs of 128 are tighter than random runs of 128: the mean spread within a run is smaller
    def spread(o: torch.Tensor) -> float:
        runs = x[o[: len(o) // 128 * 128]].view(-1, 128, x.shape[1])
        return float((runs - runs.mean(1, keepdim=True)).norm(dim=2).mean())

    assert spread(order) < 0.8 * spread(torch.randperm(len(bank), generator=torch.Generator().manual_seed(0)))
