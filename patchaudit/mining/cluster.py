"""`patchaudit cluster`: group a report's images (by default the flagged ones, by the feature at the map's
peak) into K clusters, so a reviewer sees defect *types*, not one long list.

Spherical k-means (faiss, fixed seed: the same report and K give the same clusters) on the
L2-normalised float16 embeddings. Writes, under `<report>/mining/`:
    clusters.parquet   image_uri, cluster, similarity to its cluster centre, score, is_anomalous, heatmap_uri
    clusters.json      the parameters, cluster sizes and each cluster's most central images (written last)
    clusters.html      a gallery per cluster (patchaudit.mining.gallery), also embedded by the review page
Cluster ids are ordered by size (0 = largest), so they read the same across reruns.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from patchaudit.errors import MiningError
from patchaudit.mining.reportio import MINING_PREFIX, Report, read_columns
from patchaudit.store.embeddings import read_embeddings

CLUSTERS_KEY = f"{MINING_PREFIX}clusters.parquet"
CLUSTERS_JSON = f"{MINING_PREFIX}clusters.json"
CLUSTERS_HTML = f"{MINING_PREFIX}clusters.html"
EXAMPLES = 12  # most central images per cluster kept in clusters.json (the gallery shows them)


@dataclass
class ClusterResult:
    table: pa.Table
    summary: dict[str, Any]


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): centres far apart, so groups are not merged at the start."""
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.stack(centres)


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 50, restarts: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), cosine of each vector to its centre (N,)): spherical k-means (faiss) from k-means++
    seeds, the best of `restarts` by mean cosine. Deterministic for a seed."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for r in range(restarts):
        km = faiss.Kmeans(
            x.shape[1],
            k,
            niter=niter,
            seed=seed + r,
            spherical=True,
            verbose=False,
            min_points_per_centroid=1,
            max_points_per_centroid=1_000_000,
        )
        km.train(x, init_centroids=_kmeans_pp(x, k, rng))
        centres = km.centroids / np.maximum(np.linalg.norm(km.centroids, axis=1, keepdims=True), 1e-12)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(np.ascontiguousarray(centres, dtype=np.float32))
        sims, labels = index.search(x, 1)
        score = float(sims.mean())
        if best is None or score > best[0]:
            best = (score, labels[:, 0].astype(np.int64), sims[:, 0].astype(np.float64))
    assert best is not None
    return best[1], best[2]


def compute_clusters(
    report: Report, k: int, flagged_only: bool = True, kind: str = "peak", seed: int = 0
) -> ClusterResult:
    if k < 2:
        raise MiningError(f"--clusters must be >= 2, got {k}")
    if kind not in ("pooled", "peak"):
        raise MiningError(f"unknown embedding {kind!r}; choose pooled or peak")
    emb = read_embeddings(report.store)
    if emb is None:
        raise MiningError(f"{report.uri} has no embeddings (scored with run.embeddings: false); rescore it")
    vecs = emb.pooled if kind == "pooled" else emb.peak
    if vecs is None:
        raise MiningError("this report's method has no anomaly map, so no peak embedding; use --embedding pooled")
    rows = read_columns(report, ["image_uri", "score", "is_anomalous", "heatmap_uri", "error"])
    rows = rows.filter(pc.is_null(rows["error"])).drop_columns(["error"])
    want = pa.table({"image_uri": pa.array(emb.uris, pa.string()), "_pos": pa.array(np.arange(len(emb)))})
    joined = want.join(rows, "image_uri", join_type="inner").sort_by("_pos")
    if flagged_only:
        joined = joined.filter(pc.equal(joined["is_anomalous"], True))
    pos = joined["_pos"].to_numpy()
    x = vecs[pos].astype(np.float32)
    ok = ~np.isnan(x).any(axis=1)
    joined, x = joined.filter(pa.array(ok)), x[ok]
    what = "flagged images" if flagged_only else "scored images"
    if len(x) < k:
        raise MiningError(f"{report.uri} has {len(x)} {what} with a {kind} embedding, fewer than --clusters {k}")
    t0 = time.perf_counter()
    labels, sims = kmeans(x, k, seed)
    seconds = time.perf_counter() - t0
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")  # cluster 0 = largest
    relabel = np.empty(k, np.int64)
    relabel[order] = np.arange(k)
    labels = relabel[labels]
    table = pa.table(
        {
            "image_uri": joined["image_uri"],
            "cluster": pa.array(labels.astype(np.int32)),
            "similarity": pa.array(sims),
            "score": joined["score"],
            "is_anomalous": joined["is_anomalous"],
            "heatmap_uri": joined["heatmap_uri"],
        }
    )
    clusters = []
    for c in range(k):
        members = table.filter(pc.equal(table["cluster"], c))
        central = members.sort_by([("similarity", "descending"), ("image_uri", "ascending")]).slice(0, EXAMPLES)
        scores = members["score"].to_numpy(zero_copy_only=False)
        clusters.append(
            {
                "cluster": c,
                "size": members.num_rows,
                "mean_score": float(scores.mean()) if len(scores) else None,
                "examples": central.select(["image_uri", "score", "heatmap_uri", "similarity"]).to_pylist(),
            }
        )
    summary = {
        "report": report.uri,
        "clusters": k,
        "selection": "flagged" if flagged_only else "all",
        "embedding": kind,
        "space": emb.space,
        "images": table.num_rows,
        "seed": seed,
        "kmeans_seconds": seconds,
        "groups": clusters,
        "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return ClusterResult(table.sort_by([("cluster", "ascending"), ("similarity", "descending")]), summary)


def write_clusters(report: Report, result: ClusterResult) -> str:
    """clusters.parquet, clusters.html, then clusters.json last; returns the URI of clusters.parquet."""
    from patchaudit.mining.gallery import cluster_gallery_page

    sink = io.BytesIO()
    pq.write_table(result.table, sink, compression="zstd")
    uri = report.store.write_bytes(CLUSTERS_KEY, sink.getvalue()).uri
    report.store.write_bytes(CLUSTERS_HTML, cluster_gallery_page(result.summary, report.store.uri, "mining/").encode())
    report.store.write_bytes(CLUSTERS_JSON, json.dumps(result.summary, indent=2, default=float).encode() + b"\n")
    return uri


def read_clusters(report: Report) -> pa.Table | None:
    """The report's cluster table, or None when `cluster` has not run on it."""
    if not report.store.exists(CLUSTERS_KEY):
        return None
    return pq.read_table(pa.BufferReader(report.store.read_bytes(CLUSTERS_KEY)))
