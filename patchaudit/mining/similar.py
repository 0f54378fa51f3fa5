"""`patchaudit similar`: the images most like a query image, across one or many reports.

Each report gets its own faiss index of its embeddings (cosine similarity = inner product of the
L2-normalised float16 vectors), cached under `<report>/mining/similar/<kind>/` and rebuilt when the
report's committed batches change. A query asks every report's index and merges the top k
("ask every shard, merge"). Up to EXACT_MAX vectors the index is exact (a flat float16 index: the
stored vectors exactly, no approximation); beyond, an IVF index (inverted lists over k-means cells,
float16 codes) whose recall is measured in benchmarks/archive_scale.py.

The query is an archived image (its URI, found in a report's embeddings) or a new file: then its
embedding is computed with the report's model (the model URI is in the report's run plan or summary,
or given with --model).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from patchaudit.errors import MiningError, PatchauditError
from patchaudit.mining.reportio import MINING_PREFIX, Report, read_columns
from patchaudit.store.embeddings import Embeddings, list_embedding_parts, read_embeddings

KINDS = ("pooled", "peak")
# Exact search up to this many vectors: one query over 1,000,000 float16 vectors of 152 dimensions took
# 0.2-0.5 s on a loaded 2-core VM (benchmarks/archive_scale.py), so about two million stay under the
# one-second goal; beyond, the IVF index takes over.
EXACT_MAX = 2_000_000
IVF_NPROBE = 32
INDEX_VERSION = "1"


@dataclass
class ReportIndex:
    report_uri: str
    space: str
    kind: str
    index: Any  # faiss index over the vectors, ids = row numbers of `rows`
    rows: pa.Table  # image_uri, score, is_anomalous, heatmap_uri
    exact: bool

    def __len__(self) -> int:
        return self.rows.num_rows


def _faiss() -> Any:
    import faiss

    return faiss


def build_index(vectors: np.ndarray, exact_max: int = EXACT_MAX, seed: int = 0) -> tuple[Any, bool]:
    """A faiss inner-product index over (N, D) float16 vectors: flat (exact) up to `exact_max`, IVF beyond."""
    faiss = _faiss()
    n, d = vectors.shape
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if n <= exact_max:
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        index.add(x)
        return index, True
    nlist = max(1, int(math.sqrt(n)))  # ~1,000 cells per million vectors; a query scans nprobe of them
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    rng = np.random.default_rng(seed)
    train = x[rng.choice(n, min(n, 40 * nlist), replace=False)]  # faiss asks for >= 39 points per cell
    index.train(train)
    index.add(x)
    index.nprobe = IVF_NPROBE
    return index, False


def _fingerprint(report: Report) -> str:
    ids = list_embedding_parts(report.store)
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _vectors(emb: Embeddings, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers of usable vectors, their vectors): peak rows without a map are left out."""
    if kind == "pooled":
        return np.arange(len(emb)), emb.pooled
    if emb.peak is None:
        raise MiningError("this report's method has no anomaly map, so no peak embedding; use --embedding pooled")
    ok = ~np.isnan(emb.peak.astype(np.float32)).any(axis=1)
    return np.flatnonzero(ok), emb.peak[ok]


def load_or_build(report: Report, kind: str, exact_max: int = EXACT_MAX, cache: bool = True) -> ReportIndex:
    """The report's index for `kind`, from its cache when the committed batches are unchanged."""
    if kind not in KINDS:
        raise MiningError(f"unknown embedding {kind!r}; choose one of: {', '.join(KINDS)}")
    faiss = _faiss()
    prefix = f"{MINING_PREFIX}similar/{kind}/"
    fp = _fingerprint(report)
    store = report.store
    try:
        meta = json.loads(store.read_bytes(prefix + "index.json")) if store.exists(prefix + "index.json") else None
    except (PatchauditError, ValueError):
        meta = None
    if (
        cache
        and meta
        and meta.get("fingerprint") == fp
        and meta.get("version") == INDEX_VERSION
        and meta.get("exact_max") == exact_max
    ):
        index = faiss.deserialize_index(np.frombuffer(store.read_bytes(prefix + "index.faiss"), dtype=np.uint8))
        if not meta["exact"]:
            index.nprobe = IVF_NPROBE
        rows = pq.read_table(pa.BufferReader(store.read_bytes(prefix + "rows.parquet")))
        return ReportIndex(report.uri, meta["space"], kind, index, rows, meta["exact"])
    emb = read_embeddings(store)
    if emb is None:
        raise MiningError(
            f"{report.uri} has no embeddings (it was scored with run.embeddings: false); rescore it with embeddings on"
        )
    keep, vecs = _vectors(emb, kind)
    index, exact = build_index(vecs, exact_max)
    rows = _rows_for(report, [emb.uris[i] for i in keep])
    if cache:  # the index files first, index.json last (it says they are complete)
        try:
            store.write_bytes(prefix + "index.faiss", faiss.serialize_index(index).tobytes())
            sink = io.BytesIO()
            pq.write_table(rows, sink, compression="zstd")
            store.write_bytes(prefix + "rows.parquet", sink.getvalue())
            store.write_bytes(
                prefix + "index.json",
                json.dumps(
                    {
                        "fingerprint": fp,
                        "version": INDEX_VERSION,
                        "space": emb.space,
                        "exact": exact,
                        "vectors": len(vecs),
                        "exact_max": exact_max,
                    }
                ).encode(),
            )
        except PatchauditError:  # a read-only report still answers queries, it just rebuilds next time
            pass
    return ReportIndex(report.uri, emb.space, kind, index, rows, exact)


def _rows_for(report: Report, uris: list[str]) -> pa.Table:
    """Score, flag and heatmap of `uris`, in that order (a join in Arrow, no row loop)."""
    table = read_columns(report, ["image_uri", "score", "is_anomalous", "heatmap_uri"])
    want = pa.table({"image_uri": pa.array(uris, pa.string()), "_pos": pa.array(np.arange(len(uris)))})
    joined = want.join(table, "image_uri", join_type="left outer").sort_by("_pos")
    return joined.select(["image_uri", "score", "is_anomalous", "heatmap_uri"])


def find_vector(indexes: list[ReportIndex], reports: list[Report], image_uri: str, kind: str) -> np.ndarray | None:
    """The stored vector of an archived image, if any report holds it."""
    import pyarrow.compute as pc

    for ri, _rep in zip(indexes, reports):
        hits = pc.index(ri.rows["image_uri"], image_uri).as_py()
        if hits is not None and hits >= 0:
            vec = np.empty((ri.index.d,), dtype=np.float32)
            ri.index.reconstruct(int(hits), vec) if ri.exact else _reconstruct_ivf(ri.index, int(hits), vec)
            return vec
    return None


def _reconstruct_ivf(index: Any, i: int, out: np.ndarray) -> None:
    index.make_direct_map()
    index.reconstruct(i, out)


def search(
    indexes: list[ReportIndex], query: np.ndarray, k: int, exclude_uri: str | None = None
) -> list[dict[str, Any]]:
    """The k most similar images over all indexes (merged by similarity, ties by URI)."""
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    q /= max(float(np.linalg.norm(q)), 1e-12)
    hits: list[tuple[float, str, int, int]] = []
    for r, ri in enumerate(indexes):
        kk = min(len(ri), k + 1)
        if kk == 0:
            continue
        sims, ids = ri.index.search(q, kk)
        for s, i in zip(sims[0], ids[0]):
            if i >= 0:
                hits.append((float(s), ri.rows["image_uri"][int(i)].as_py(), r, int(i)))
    hits = [h for h in hits if h[1] != exclude_uri]
    hits.sort(key=lambda h: (-h[0], h[1]))
    out = []
    for rank, (s, _uri, r, i) in enumerate(hits[:k], start=1):
        row = indexes[r].rows.slice(i, 1).to_pylist()[0]
        out.append({"rank": rank, "similarity": s, **row, "report": indexes[r].report_uri})
    return out


def embed_file(model_uri: str, data: bytes, space: str, kind: str) -> np.ndarray:
    """The embedding of a new image file, computed with the report's model (its space must match)."""
    import torch

    from patchaudit.workers.decode import DecodeError, decode_image
    from patchaudit.workers.embeddings import embedding_space
    from patchaudit.workers.model import load_model
    from patchaudit.workers.pipeline import Decoded, score_decoded

    try:
        model = load_model(model_uri)
    except PatchauditError as exc:
        raise MiningError(f"cannot load the report's model {model_uri} to embed the query file: {exc}") from None
    if embedding_space(model) != space:
        raise MiningError(
            f"model {model_uri} embeds into {embedding_space(model)}, the report into {space}; "
            "pass the report's model with --model"
        )
    try:
        img = decode_image(data, model.preprocess)
    except DecodeError as exc:
        raise MiningError(f"the query image cannot be decoded: {exc}") from None
    with torch.inference_mode():
        (res,) = score_decoded(model, [Decoded("query", img, None, 0.0)], embeddings=True)
    vec = res.pooled if kind == "pooled" else res.peak
    if vec is None:
        raise MiningError("the model has no anomaly map, so no peak embedding; use --embedding pooled")
    return vec.astype(np.float32)


def check_spaces(indexes: list[ReportIndex]) -> str:
    spaces = sorted({ri.space for ri in indexes})
    if len(spaces) != 1:
        detail = ", ".join(f"{ri.report_uri}: {ri.space}" for ri in indexes)
        raise MiningError(f"the reports' embeddings are not comparable (different backbones or settings): {detail}")
    return spaces[0]
