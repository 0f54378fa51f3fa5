"""Synthetic reports with the real schema and embeddings, for the mining tests and the archive-scale benchmark.

An image's "true" anomaly level and its embedding cluster depend only on its index, so two reports
written with different `seed`s look like two runs (two models) over the same archive: correlated
scores, some flags that change. Columns are built as whole arrays (no per-row Python), so a
million-row report takes seconds.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from patchaudit.store import reports
from patchaudit.store.embeddings import embeddings_table, write_embeddings
from patchaudit.store.objects import open_store


@dataclass(frozen=True)
class Synthetic:
    n: int
    seed: int = 0
    model_id: str = "patchcore-synthetic-000000000000"
    threshold: float = 1.0
    batch_size: int = 1000
    dim: int = 152
    folders: int = 10
    clusters: int = 8
    noise: float = 0.15  # score noise between two runs (their seeds)
    start: int = 0  # first image index (reports over shifted ranges share only part of their images)
    errors_every: int = 0  # every k-th image is an error row (0: none)
    changed_etag_every: int = 0  # every k-th image has another etag (a rewritten file)
    root: str = "s3://archive/line-7/2026/12/02"
    space: str = "patchcore-synthetic-space"
    embeddings: bool = True


def image_index(cfg: Synthetic) -> np.ndarray:
    return np.arange(cfg.start, cfg.start + cfg.n, dtype=np.int64)


def true_level(idx: np.ndarray) -> np.ndarray:
    """A per-image anomaly level shared by every run: about 5% of images sit clearly above 1."""
    rng = np.random.default_rng(12345)
    base = rng.lognormal(-0.5, 0.45, size=int(idx.max()) + 1)
    return base[idx]


def cluster_of(idx: np.ndarray, clusters: int) -> np.ndarray:
    return (idx * 2654435761 % 2**32) % clusters  # a fixed pseudo-random cluster per image


def write_report(uri: str, cfg: Synthetic) -> str:
    """Write parts (and embeddings parts) of a synthetic report at `uri`; returns its URI."""
    store = open_store(uri)
    idx = image_index(cfg)
    rng = np.random.default_rng(cfg.seed)
    score = true_level(idx) * np.exp(rng.normal(0, cfg.noise, size=cfg.n))
    folder = idx % cfg.folders
    uris = (
        np.char.add(
            np.char.add(f"{cfg.root}/cam-", folder.astype(str)), np.char.add("/img-", np.char.zfill(idx.astype(str), 9))
        ).astype(object)
        + ".png"
    )
    etag = np.char.add("e", idx.astype(str)).astype(object)
    if cfg.changed_etag_every:
        changed = idx % cfg.changed_etag_every == 0
        etag[changed] = np.char.add("f", idx[changed].astype(str)).astype(object)
    err = np.zeros(cfg.n, bool) if not cfg.errors_every else (idx % cfg.errors_every == 0)
    flag = score >= cfg.threshold
    centers = np.random.default_rng(7).normal(size=(cfg.clusters, cfg.dim)).astype(np.float32)
    for b, s in enumerate(range(0, cfg.n, cfg.batch_size)):
        sl = slice(s, min(cfg.n, s + cfg.batch_size))
        m = sl.stop - sl.start
        e = err[sl]
        px = rng.integers(0, 900, size=m).astype(np.int32)
        py = rng.integers(0, 900, size=m).astype(np.int32)
        heat = np.where(
            flag[sl] & ~e, np.char.add(f"{store.uri}/heatmaps/h", idx[sl].astype(str)).astype(object) + ".png", None
        )
        cols = {
            "run_id": pa.array([f"synthetic-{cfg.seed}"] * m),
            "image_uri": pa.array(uris[sl], pa.string()),
            "size": pa.array(np.full(m, 250_000, np.int64)),
            "etag": pa.array(etag[sl], pa.string()),
            "model_id": pa.array([cfg.model_id] * m),
            "score": pa.array(score[sl], mask=e),
            "is_anomalous": pa.array(flag[sl], mask=e),
            "threshold": pa.array(np.full(m, cfg.threshold)),
            "map_max": pa.array(score[sl], mask=e),
            "map_mean": pa.array(score[sl] / 4, mask=e),
            "anomalous_area_fraction": pa.array(np.clip(score[sl] - cfg.threshold, 0, 1) / 10, mask=e),
            "peak_x": pa.array(px, mask=e),
            "peak_y": pa.array(py, mask=e),
            "heatmap_uri": pa.array(heat, pa.string()),
            "error": pa.array(np.where(e, "decode: not an image", None), pa.string()),
            "attempt": pa.array(np.ones(m, np.int32)),
            "worker": pa.array(["synthetic"] * m),
            "decode_ms": pa.array(np.full(m, 5.0)),
            "feature_ms": pa.array(np.full(m, 20.0), mask=e),
            "knn_ms": pa.array(np.full(m, 10.0), mask=e),
        }
        table = pa.table(cols, schema=reports.REPORT_SCHEMA)
        batch_id = f"b{b:06d}"
        if cfg.embeddings:
            ok = ~e
            c = cluster_of(idx[sl][ok], cfg.clusters)
            pooled = centers[c] + rng.normal(0, 0.6, size=(ok.sum(), cfg.dim)).astype(np.float32)
            peak = centers[c] + rng.normal(0, 0.4, size=(ok.sum(), cfg.dim)).astype(np.float32)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
            peak /= np.linalg.norm(peak, axis=1, keepdims=True)
            write_embeddings(store, batch_id, embeddings_table(list(uris[sl][ok]), pooled, peak, cfg.space))
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        store.write_bytes(reports.part_key(batch_id), sink.getvalue())
    store.write_bytes("run.json", json.dumps({"run_id": f"synthetic-{cfg.seed}", "model_id": cfg.model_id}).encode())
    return store.uri
