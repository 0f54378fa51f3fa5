"""A PatchCore bank's shard files: vectors as safetensors (+ the faiss index of an approximate bank),
loaded for either search backend and checked against the manifest; models saved in faiss's format only
still load (with faiss) or say to refit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from patchaudit.errors import ArtifactError
from patchaudit.store.artifacts import read_manifest, write_model
from patchaudit.store.objects import open_store
from patchaudit.workers import index_files
from patchaudit.workers.index_files import (
    auto_backend,
    load_shard,
    shard_bytes,
    shard_state,
    vectors_from_bytes,
    vectors_to_bytes,
)
from patchaudit.workers.knn import FaissShard, IndexSpec, TorchShard


def _bank() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)


def _save(tmp_path, index_type: str, shards) -> tuple:
    files, entries = {}, []
    for i, shard in enumerate(shards):
        entry, f = shard_state(i, shard, index_type)
        files.update(f)
        entries.append(entry)
    store = open_store(str(tmp_path / f"model-{index_type}"))
    write_model(store, {"index_type": index_type, "shards": entries}, files)
    return store, read_manifest(store)


@pytest.fixture
def flat_model(tmp_path):
    bank = _bank()
    store, manifest = _save(tmp_path, "flat", [TorchShard(bank[:200], 0), TorchShard(bank[200:], 200)])
    return store, manifest, bank


def test_flat_bank_is_one_safetensors_file_per_shard(flat_model, tmp_path):
    store, manifest, bank = flat_model
    assert sorted(manifest["files"]) == ["shard_000.safetensors", "shard_001.safetensors"]
    assert manifest["shards"][1] == {"vectors": "shard_001.safetensors", "offset": 200, "ntotal": 100}
    assert shard_bytes(manifest, 1) == manifest["files"]["shard_001.safetensors"]["size"]
    # documented format: any safetensors reader gets the vectors and the offset
    with safe_open(str(tmp_path / "model-flat" / "shard_001.safetensors"), framework="numpy") as f:
        assert list(f.keys()) == ["vectors"]
        assert f.metadata() == {"format": index_files.BANK_FORMAT, "offset": "200"}
        np.testing.assert_array_equal(f.get_tensor("vectors"), bank[200:])


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_flat_shard_loads_for_either_backend(flat_model, backend):
    store, manifest, bank = flat_model
    shard = load_shard(store, manifest, 1, backend)
    assert isinstance(shard, FaissShard if backend == "faiss" else TorchShard)
    assert shard.offset == 200 and shard.ntotal == 100
    np.testing.assert_array_equal(shard.vectors(), bank[200:])
    _, ids = shard.search(bank[250:251], 1)
    assert ids[0, 0] == 250  # global id


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_bank_keeps_its_faiss_index_beside_the_vectors(tmp_path, index_type):
    bank = _bank()
    spec = IndexSpec(index_type, hnsw_m=8, ivf_nlist=4) if index_type == "ivf" else IndexSpec(index_type, hnsw_m=8)
    store, manifest = _save(tmp_path, index_type, [FaissShard.build(bank, 0, spec)])
    entry = manifest["shards"][0]
    assert entry["index"] == "shard_000.faiss" and entry["vectors"] == "shard_000.safetensors"
    assert shard_bytes(manifest, 0) == sum(manifest["files"][n]["size"] for n in manifest["files"])
    by_faiss = load_shard(store, manifest, 0, "faiss")
    assert type(by_faiss.index).__name__ == {"hnsw": "IndexHNSWFlat", "ivf": "IndexIVFFlat"}[index_type]
    by_torch = load_shard(store, manifest, 0, "torch")
    np.testing.assert_array_equal(by_torch.vectors(), bank)
    with pytest.raises(ArtifactError, match="can only be saved from faiss shards"):
        shard_state(0, TorchShard(bank), index_type)


def old_style_model(tmp_path, bank):
    """A model as saved before the vectors had their own file: shard_000.faiss only."""
    store = open_store(str(tmp_path / "old"))
    data = FaissShard.build(bank, 0, IndexSpec("flat")).to_bytes()
    write_model(
        store,
        {"index_type": "flat", "shards": [{"file": "shard_000.faiss", "offset": 0, "ntotal": 300}]},
        {"shard_000.faiss": data},
    )
    return store, read_manifest(store)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_models_saved_in_faiss_format_only_still_load(tmp_path, backend):
    bank = _bank()
    store, manifest = old_style_model(tmp_path, bank)
    shard = load_shard(store, manifest, 0, backend)
    np.testing.assert_array_equal(shard.vectors(), bank)
    assert shard_bytes(manifest, 0) == manifest["files"]["shard_000.faiss"]["size"]


def test_old_model_without_faiss_says_refit(tmp_path, monkeypatch):
    store, manifest = old_style_model(tmp_path, _bank())
    monkeypatch.setattr(index_files, "_has_faiss", lambda: False)
    with pytest.raises(ArtifactError, match=r"only in faiss's format .* refit it with `patchaudit fit`"):
        load_shard(store, manifest, 0, "torch")


def test_vectors_file_errors():
    good = vectors_to_bytes(_bank()[:3], 7)
    assert vectors_from_bytes(good, "x").shape == (3, 8)
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        vectors_from_bytes(good[:20], "x")
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        vectors_from_bytes(json.dumps({"vectors": 1}).encode(), "x")
    from safetensors.numpy import save

    with pytest.raises(ArtifactError, match="one float32 .* named 'vectors'"):
        vectors_from_bytes(save({"vectors": np.zeros((2, 2), np.float64)}), "x")
    with pytest.raises(ArtifactError, match="one float32 .* named 'vectors'"):
        vectors_from_bytes(save({"bank": np.zeros((2, 2), np.float32)}), "x")
    with pytest.raises(ArtifactError, match="2-d array"):
        vectors_to_bytes(np.zeros(3, np.float32), 0)


def test_load_shard_errors(flat_model):
    store, manifest, _ = flat_model
    with pytest.raises(ArtifactError, match="model has 2 shard"):
        load_shard(store, manifest, 2)
    manifest["shards"][0]["ntotal"] = 201
    with pytest.raises(ArtifactError, match="holds 200 vectors, manifest says 201"):
        load_shard(store, manifest, 0, "torch")


def test_auto_backend():
    assert auto_backend("flat", "cpu") == "torch"
    assert auto_backend("ivf", "cpu") == "faiss"
    assert auto_backend("hnsw", "cuda") == "torch"
