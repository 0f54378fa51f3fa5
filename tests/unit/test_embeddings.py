"""Mining embeddings: the pooled and peak vectors a worker computes, and the embeddings parts' commit rule."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchaudit.store import reports
from patchaudit.store.embeddings import embeddings_table, read_embeddings, write_embeddings
from patchaudit.store.objects import open_store
from patchaudit.store.reports import ReportError
from patchaudit.workers.embeddings import compute


def test_pooled_and_peak_of_a_patch_grid():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 5, 4, 6, generator=g)  # (B, D, h, w) as PatchCore's embed returns
    maps = torch.zeros(2, 32, 48)  # input-resolution maps: 8 px per grid cell
    maps[0, 17, 5] = 3.0  # grid cell (2, 0)
    maps[1, 31, 47] = 1.0  # last cell (3, 5)
    out = compute(SimpleNamespace(method="patchcore"), emb, maps)
    assert out.pooled.dtype == np.float16 and out.pooled.shape == (2, 5)
    want_pooled = F.normalize(emb.mean(dim=(2, 3)), dim=1).numpy()
    np.testing.assert_allclose(out.pooled, want_pooled, atol=2e-3)
    want_peak = F.normalize(torch.stack([emb[0, :, 2, 0], emb[1, :, 3, 5]]), dim=1).numpy()
    np.testing.assert_allclose(out.peak, want_peak, atol=2e-3)


def test_image_level_method_has_no_peak():
    feats = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)]  # Gaussian AD's stage maps
    out = compute(SimpleNamespace(method="gaussian"), feats, None)
    assert out.peak is None and out.pooled.shape == (3, 10)
    np.testing.assert_allclose(np.linalg.norm(out.pooled.astype(np.float32), axis=1), 1.0, atol=2e-3)


def _part(store, batch_id, uris):
    rows = [
        {
            "run_id": "r",
            "image_uri": u,
            "size": 1,
            "etag": "e",
            "model_id": "m",
            "threshold": 1.0,
            "score": 0.5,
            "is_anomalous": False,
            "attempt": 0,
            "worker": "w",
        }
        for u in uris
    ]
    reports.write_part(store, batch_id, rows)


def test_only_committed_batches_are_read(tmp_path):
    store = open_store(str(tmp_path))
    v = np.eye(3, dtype=np.float32)
    write_embeddings(store, "b000000", embeddings_table(["a", "b"], v[:2], v[:2], "space-1"))
    _part(store, "b000000", ["a", "b"])
    # a batch that died between its embeddings part and its report part: not committed, not read
    write_embeddings(store, "b000001", embeddings_table(["c"], v[2:], v[2:], "space-1"))
    e = read_embeddings(store)
    assert e.uris == ["a", "b"] and e.space == "space-1"
    np.testing.assert_array_equal(e.pooled, v[:2].astype(np.float16))
    _part(store, "b000001", ["c"])  # its retry commits it
    assert read_embeddings(store).uris == ["a", "b", "c"]


def test_mixed_spaces_and_missing_embeddings(tmp_path):
    store = open_store(str(tmp_path))
    assert read_embeddings(store) is None
    v = np.eye(2, dtype=np.float32)
    write_embeddings(store, "b1", embeddings_table(["a"], v[:1], None, "space-1"))
    write_embeddings(store, "b2", embeddings_table(["b"], v[1:], None, "space-2"))
    _part(store, "b1", ["a"])
    _part(store, "b2", ["b"])
    with pytest.raises(ReportError, match="more than one space"):
        read_embeddings(store)
    assert read_embeddings(store, ["b1"]).peak is None


def test_table_validation():
    with pytest.raises(ReportError, match="must be"):
        embeddings_table(["a", "b"], np.ones((1, 3)), None, "s")
    with pytest.raises(ReportError, match="NaN"):
        embeddings_table(["a"], np.full((1, 3), np.nan), None, "s")
    with pytest.raises(ReportError, match="peak"):
        embeddings_table(["a"], np.ones((1, 3)), np.ones((1, 2)), "s")
