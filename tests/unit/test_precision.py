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
    # shows the re-rank is what makes it exact (and that the test data is hard enough to tell).
    bank, queries = clustered_bank()
    exact_d, _ = TorchShard(bank).search(queries, k=1)
    low_d, _ = TorchShard(bank, precision="bf16", refine=1).search(queries, k=1)
    assert (low_d > exact_d + 1e-3).any()
    assert (low_d >= exact_d - 1e-3).all()  # never better than exact: distances are exact for the id found


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
