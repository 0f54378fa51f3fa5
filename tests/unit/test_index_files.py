"""A PatchCore bank's shard files: loading one shard for either search backend, checked against the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from patchaudit.errors import ArtifactError
from patchaudit.store.artifacts import read_manifest, write_model
from patchaudit.store.objects import open_store
from patchaudit.workers.index_files import auto_backend, load_shard, shard_file
from patchaudit.workers.knn import FaissShard, IndexSpec, TorchShard


@pytest.fixture
def bank_store(tmp_path):
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((50, 8)).astype(np.float32)
    parts = [(0, bank[:30]), (30, bank[30:])]
    files, shards = {}, []
    for i, (offset, vecs) in enumerate(parts):
        files[shard_file(i)] = FaissShard.build(vecs, offset, IndexSpec("flat")).to_bytes()
        shards.append({"file": shard_file(i), "offset": offset, "ntotal": len(vecs)})
    store = open_store(str(tmp_path / "model"))
    write_model(store, {"index_type": "flat", "shards": shards}, files)
    return store, bank


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_load_shard_holds_the_shards_vectors_at_its_offset(bank_store, backend):
    store, bank = bank_store
    manifest = read_manifest(store)
    shard = load_shard(store, manifest, 1, backend)
    assert isinstance(shard, FaissShard if backend == "faiss" else TorchShard)
    assert shard.offset == 30 and shard.ntotal == 20
    np.testing.assert_array_equal(shard.vectors(), bank[30:])
    _, ids = shard.search(bank[35:36], 1)
    assert ids[0, 0] == 35  # global id


def test_load_shard_errors(bank_store):
    store, _ = bank_store
    manifest = read_manifest(store)
    with pytest.raises(ArtifactError, match="model has 2 shard"):
        load_shard(store, manifest, 2)
    manifest["shards"][0]["ntotal"] = 31
    with pytest.raises(ArtifactError, match="holds 30 vectors, manifest says 31"):
        load_shard(store, manifest, 0, "faiss")


def test_auto_backend():
    assert auto_backend("flat", "cpu") == "torch"
    assert auto_backend("ivf", "cpu") == "faiss"
    assert auto_backend("hnsw", "cuda") == "torch"
