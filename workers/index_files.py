"""A PatchCore bank's files: how a shard is saved and loaded as the search backend wants it.

Shard i of a bank is saved as `shard_00i.safetensors`: one float32 tensor `vectors` (ntotal, D), the
bank vectors with global ids offset .. offset + ntotal - 1 (the offset is also in the file's metadata).
safetensors is a documented format any language reads. An approximate (ivf, hnsw) bank also keeps
its trained faiss index beside it, `shard_00i.faiss`, in faiss's own format read by faiss; an exact
(flat) bank needs none: the faiss backend builds its flat index from the vectors when it loads them.

Models saved before the vectors were stored this way hold only `shard_00i.faiss` (manifest entries
with "file" instead of "vectors"); they load with faiss installed, else the error says to refit.

Used by the model (all shards in one process) and by the index-shard actors (one shard each), so the
actors need not import the model code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from patchaudit.errors import ArtifactError
from patchaudit.store.artifacts import read_model_file
from patchaudit.store.objects import ObjectStore
from patchaudit.workers.knn import FaissShard, IndexSpec, Shard, TorchShard

BANK_FORMAT = "patchaudit bank shard 1"  # in each vectors file's metadata


def vectors_file(i: int) -> str:
    return f"shard_{i:03d}.safetensors"


def index_file(i: int) -> str:
    return f"shard_{i:03d}.faiss"


def vectors_to_bytes(vectors: np.ndarray, offset: int) -> bytes:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ArtifactError(f"bank vectors must be a 2-d array, got shape {x.shape}")
    return save_safetensors({"vectors": x}, metadata={"format": BANK_FORMAT, "offset": str(int(offset))})


def vectors_from_bytes(data: bytes, name: str) -> np.ndarray:
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise ArtifactError(f"bank file {name} is not a valid safetensors file: {exc}") from None
    x = tensors.get("vectors")
    if set(tensors) != {"vectors"} or x is None or x.ndim != 2 or x.dtype != np.float32:
        raise ArtifactError(f"bank file {name} must hold one float32 (n, d) tensor named 'vectors'")
    return x


def shard_state(i: int, shard: Shard, index_type: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest entry, files) saving shard i: its vectors, and the faiss index of an approximate bank."""
    files = {vectors_file(i): vectors_to_bytes(shard.vectors(), shard.offset)}
    entry: dict[str, Any] = {"vectors": vectors_file(i), "offset": shard.offset, "ntotal": shard.ntotal}
    if index_type != "flat":
        if not isinstance(shard, FaissShard):
            raise ArtifactError(f"a {index_type} bank can only be saved from faiss shards")
        files[index_file(i)] = shard.to_bytes()
        entry["index"] = index_file(i)
    return entry, files


def shard_bytes(manifest: dict[str, Any], i: int) -> int:
    """Bytes of shard i's files (what an index-shard actor reads)."""
    entry = manifest["shards"][i]
    return sum(manifest["files"][entry[k]]["size"] for k in ("vectors", "index", "file") if k in entry)


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
    offset = int(entry["offset"])
    device = torch.device(device)
    backend = auto_backend(manifest.get("index_type", "flat"), device) if knn_backend == "auto" else knn_backend
    shard: FaissShard | TorchShard
    config = manifest.get("config") or {}
    precision, refine = str(config.get("precision", "fp32")), int(config.get("knn_refine", 8))
    if "vectors" in entry:
        if backend == "faiss" and "index" in entry:
            shard = FaissShard.from_bytes(read_model_file(store, manifest, entry["index"]), offset)
        else:
            vecs = vectors_from_bytes(read_model_file(store, manifest, entry["vectors"]), entry["vectors"])
            if backend == "faiss":
                shard = FaissShard.build(vecs, offset, IndexSpec("flat"))
            else:
                shard = TorchShard(vecs, offset, device=str(device), precision=precision, refine=refine)
    else:  # saved before the vectors had a file of their own: faiss's format only
        data = read_model_file(store, manifest, entry["file"])
        if backend == "faiss":
            shard = FaissShard.from_bytes(data, offset)
        elif _has_faiss():
            shard = TorchShard(
                FaissShard.from_bytes(data, 0).vectors(), offset, device=str(device), precision=precision, refine=refine
            )
        else:
            raise ArtifactError(
                f"model at {store.uri} stores its bank only in faiss's format ({entry['file']}), which needs faiss "
                "(pip install faiss-cpu); or refit it with `patchaudit fit` to store the bank as safetensors"
            )
    if shard.ntotal != int(entry["ntotal"]):
        name = entry.get("vectors", entry.get("file"))
        raise ArtifactError(f"shard {name} holds {shard.ntotal} vectors, manifest says {entry['ntotal']}")
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
