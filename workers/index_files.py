"""A PatchCore bank's files: which file holds shard i, loading a shard as the search backend wants it.

Used by the model (all shards in one process) and by the index-shard actors (one shard each), so the
actors need not import the model code.
"""

from __future__ import annotations

from typing import Any

import torch

from patchaudit.errors import ArtifactError
from patchaudit.store.artifacts import read_model_file
from patchaudit.store.objects import ObjectStore
from patchaudit.workers.knn import FaissShard, TorchShard, read_flat_index_vectors


def shard_file(i: int) -> str:
    return f"shard_{i:03d}.faiss"


def load_shard(
    store: ObjectStore, manifest: dict[str, Any], i: int, knn_backend: str = "auto", device: Any = "cpu"
) -> FaissShard | TorchShard:
    """Load shard i of a model's bank, verified against the manifest (index-shard actors hold one each).

    A torch shard searches in the model's `precision` (config), re-ranking `knn_refine` candidates exactly.
    """
    shards = manifest["shards"]
    if not 0 <= i < len(shards):
        raise ArtifactError(f"model has {len(shards)} shard(s); shard {i} does not exist")
    entry = shards[i]
    data = read_model_file(store, manifest, entry["file"])
    device = torch.device(device)
    backend = auto_backend(manifest.get("index_type", "flat"), device) if knn_backend == "auto" else knn_backend
    shard: FaissShard | TorchShard
    if backend == "faiss":
        shard = FaissShard.from_bytes(data, int(entry["offset"]))
    else:
        vecs = FaissShard.from_bytes(data, 0).vectors() if _has_faiss() else read_flat_index_vectors(data)
        config = manifest.get("config") or {}
        shard = TorchShard(vecs, int(entry["offset"]), device=str(device), precision=config.get("precision", "fp32"),
                           refine=int(config.get("knn_refine", 8)))
    if shard.ntotal != int(entry["ntotal"]):
        raise ArtifactError(f"shard {entry['file']} holds {shard.ntotal} vectors, manifest says {entry['ntotal']}")
    return shard


def auto_backend(index_type: str, device: Any) -> str:
    """`knn_backend: auto`: torch for exact (flat) banks, on GPUs and without faiss; faiss for ivf/hnsw.

    Exact search by torch's blocked matmul ran 3x faster than faiss `IndexFlatL2` on a 2-core Xeon
    (`benchmarks/knn.py`); the approximate indexes exist only in faiss.
    """
    exact = index_type == "flat"
    return "torch" if exact or torch.device(device).type == "cuda" or not _has_faiss() else "faiss"


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
