"""model.precision: reduced-precision backbone and k-NN (with the exact fp32 re-rank) against fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from knn_check import assert_knn_equivalent, sq_l2

from patchaudit.errors import ConfigError
from patchaudit.workers.config import model_config_from_dict
from patchaudit.workers.knn import TorchShard, build_shards


def clustered_bank(n: int = 3000, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with a large common offset (as CNN activations have); queries from the same cloud, so their
    nearest and second-nearest bank vectors are often within half precision's rounding of each other."""
    rng = np.random.default_rng(seed)
    bank = (5.0 + rng.standard_normal((n, d))).astype(np.float32)
    queries = (5.0 + rng.standard_normal((400, d))).astype(np.float32)
    return bank, queries


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_search_finds_the_exact_neighbours(precision):
    bank, queries = clustered_bank()
    exact = TorchShard(bank, chunk=700).search(queries, k=3)
    low = TorchShard(bank, chunk=700, precision=precision, refine=8).search(queries, k=3)
    # the re-rank makes the reported distances exact fp32 ones, and the ids the true nearest
    assert_knn_equivalent(exact, low, all_d=sq_l2(queries, bank))


def test_without_refine_reduced_precision_can_miss():
    # refine=1 ranks by the rounded distances alone: the test above would fail for some queries; this
    # shows the re-rank is what makes it exact (and that the test data is hard enough to tell). k=2:
    # k=1 on the CPU takes the bounded search instead (below), which needs no `refine`.
    bank, queries = clustered_bank()
    exact_d, _ = TorchShard(bank).search(queries, k=2)
    low_d, _ = TorchShard(bank, precision="bf16", refine=1).search(queries, k=2)
    assert (low_d > exact_d + 1e-3).any()
    assert (low_d[:, 0] >= exact_d[:, 0] - 1e-3).all()  # never better than exact: distances are exact for the id found


def offset_bank(scale: float, offset: float, n: int = 3000, d: int = 152, seed: int = 1):
    """Non-negative features (as post-ReLU CNN activations) with a common offset; queries are bank vectors
    (distance 0), slightly moved copies of them (near ties) and fresh draws."""
    rng = np.random.default_rng(seed)
    bank = (offset + scale * np.abs(rng.standard_normal((n, d)))).astype(np.float32)
    fresh = (offset + scale * np.abs(rng.standard_normal((200, d)))).astype(np.float32)
    moved = bank[:200] + (1e-3 * scale * rng.standard_normal((200, d))).astype(np.float32)
    return bank, np.concatenate([bank[200:300], moved, fresh])


@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1.0, 5.0), (30.0, 100.0), (1e-3, 0.0)])
@pytest.mark.parametrize("chunk", [1024, 300])
def test_bf16_bounded_1nn_is_the_fp32_search(scale, offset, chunk):
    """k=1 on the CPU with the bf16 prefilter (the default where the CPU has AVX512-BF16/AMX): cell minima by the bf16 GEMM, then exact search of every cell the error
    bound keeps. Same neighbours (up to ties) and exact distances as fp32, whatever the data's scale."""
    bank, queries = offset_bank(scale, offset)
    all_d = sq_l2(queries, bank)
    ref = (all_d.min(1, keepdims=True).astype(np.float32), all_d.argmin(1)[:, None])
    for prefilter in ("fp32", "bf16"):
        got = TorchShard(bank, chunk=chunk, query_block=128, prefilter=prefilter).search(queries, k=1)
        assert_knn_equivalent(ref, got, all_d=all_d, rtol=1e-5, atol=1e-5 * scale * scale)


@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1.0, 5.0), (30.0, 100.0)])
def test_bf16_cell_minima_stay_within_the_bound_and_the_bound_is_needed(scale, offset):
    from patchaudit.workers.knn import _PrunedNearest

    bank, queries = offset_bank(scale, offset)
    q = torch.from_numpy(queries)
    p = _PrunedNearest(torch.from_numpy(bank), 256, 1 << 20, bf16=True)
    qc = q - p.mean
    nq2 = qc.square().sum(1, keepdim=True)
    hi, lo = (t.to(torch.bfloat16) for t in (nq2, nq2 - nq2.to(torch.bfloat16).float()))
    one = torch.ones_like(hi)
    qa16 = torch.cat([qc.to(torch.bfloat16), hi, lo, one, one], 1)
    approx = torch.cat([p._cell_mins(torch.mm(qa16, p.aug16[s : s + p.chunk].T)) for s in p.starts], 1).float()
    # (M, N) exact distances, to the bank in the cells' order (coherent_order)
    true = torch.from_numpy(sq_l2(queries, bank[p.order.numpy()])).float()
    pad = p.n_cells * p.cell - len(bank)
    true_cells = torch.nn.functional.pad(true, (0, pad), value=float("inf")).view(len(q), p.n_cells, p.cell).amin(2)
    err = p._bf16_error(approx, nq2.sqrt())
    assert ((approx - true_cells).abs() <= err).all()  # the bound holds for every query and cell
    # ... and it is not vacuous: it keeps a few cells per query, not all of them
    cand = p.candidates(q)
    assert cand[torch.arange(len(q)), true.argmin(1) // p.cell].all()  # the true nearest's cell is always kept
    assert cand.sum(1).float().mean() < 0.5 * p.n_cells
    # without the bound (the bf16 minimum alone) some queries would pick a wrong cell
    if offset > 0:
        wrong = approx.argmin(1) != true.argmin(1) // p.cell
        assert wrong.any()


def test_build_shards_passes_precision_and_rejects_unknown():
    bank, queries = clustered_bank(n=500)
    shards = build_shards(bank, 2, backend="torch", precision="bf16", refine=4)
    assert [s.precision for s in shards] == ["bf16", "bf16"] and shards[1].offset == 250
    with pytest.raises(ConfigError, match="fp32, bf16, fp16"):
        TorchShard(bank, precision="int8")


def test_config_precision_choices():
    assert model_config_from_dict({}).precision == "fp32"
    assert model_config_from_dict({"precision": "bf16", "knn_refine": 4}).knn_refine == 4
    with pytest.raises(ConfigError, match="precision"):
        model_config_from_dict({"precision": "fp8"})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_backbone_autocast_features_close_and_fp32(precision):
    import timm

    from patchaudit.workers.backbones import Backbone, ResolvedWeights

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(2, 3))
    bb = Backbone("resnet18", model, (2, 3), ResolvedWeights({}, "", "random"), (0.5,) * 3, (0.25,) * 3)
    x = torch.randn(2, 3, 64, 64)
    ref = bb.extract(x)
    bb.precision = precision
    low = bb.extract(x)
    for a, b in zip(ref, low):
        assert b.dtype == torch.float32 and b.shape == a.shape  # what the methods get is fp32 whatever ran
        assert not torch.equal(a, b)  # the forward really ran in reduced precision ...
        assert (a - b).norm() / a.norm() < 0.05  # ... and stays close
