"""A fitted model's bank under both k-NN backends, on real bottle images: what `fit` searches and saves.

An exact (flat) bank is searched with torch during `fit` (calibration included) and saved as a faiss
flat file; loading it with either backend gives the same scores. An IVF bank stays faiss throughout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from patchaudit.workers.knn import FaissShard, TorchShard

REPO = Path(__file__).resolve().parents[2]


def _embeddings(model, data_dir, n: int = 3) -> torch.Tensor:
    from patchaudit.store.objects import open_store
    from patchaudit.workers.datasets import discover, require_test
    from patchaudit.workers.fit import train_batches

    store = open_store(str(data_dir))
    keys = [t.key for t in require_test(discover(store))][::20][:n]
    with torch.inference_mode():
        return torch.cat([model.embed(x) for x in train_batches(model, store, keys, 2, [])])


def test_saved_flat_bank_scores_the_same_under_both_backends(small_model):
    from patchaudit.workers.model import load_model

    by_faiss = load_model(small_model.uri, knn_backend="faiss")
    by_torch = load_model(small_model.uri)  # auto
    assert all(isinstance(s, FaissShard) for s in by_faiss.index.shards)
    assert all(isinstance(s, TorchShard) for s in by_torch.index.shards)
    np.testing.assert_array_equal(
        np.concatenate([s.vectors() for s in by_torch.index.shards]),
        np.concatenate([s.vectors() for s in by_faiss.index.shards]),
    )
    emb = _embeddings(by_torch, small_model.data_dir)
    a, b = by_torch.score_embeddings(emb), by_faiss.score_embeddings(emb)
    np.testing.assert_allclose(a.image_scores, b.image_scores, rtol=1e-5)
    np.testing.assert_allclose(a.grid_maps.numpy(), b.grid_maps.numpy(), rtol=1e-4, atol=1e-4)


def test_fit_searches_flat_with_torch_and_ivf_with_faiss(small_model, tmp_path):
    from patchaudit.scheduler.config import load_config
    from patchaudit.store.objects import open_store
    from patchaudit.workers.fit import fit_model
    from patchaudit.workers.model import load_model

    config = load_config(str(REPO / "configs" / "default.yaml")).model
    store = open_store(str(small_model.data_dir))
    keys = small_model.train_keys[:12]
    flat, _ = fit_model(config, store, keys)
    assert all(isinstance(s, TorchShard) for s in flat.index.shards)
    flat.save(str(tmp_path / "flat"))
    assert all(isinstance(s, FaissShard) for s in load_model(str(tmp_path / "flat"), knn_backend="faiss").index.shards)

    ivf_cfg = dataclasses.replace(config, patchcore=dataclasses.replace(config.patchcore, index="ivf"))
    ivf, _ = fit_model(ivf_cfg, store, keys)
    assert all(isinstance(s, FaissShard) for s in ivf.index.shards)
    ivf.save(str(tmp_path / "ivf"))
    loaded = load_model(str(tmp_path / "ivf"))  # auto: faiss for an approximate index
    assert type(loaded.index.shards[0].index).__name__ == "IndexIVFFlat"
