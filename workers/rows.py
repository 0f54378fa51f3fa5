"""Scored images to report rows (the Parquet schema of store.reports), plus heatmap PNGs.

Used by the single-process scorer and the Ray feature workers alike, so both write the same rows.
Heatmaps are named by a hash of the image URI, so a retried batch overwrites its heatmaps too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from patchaudit.store.objects import ObjectInfo, ObjectStore
from patchaudit.workers.maps import heatmap_png
from patchaudit.workers.model import AnomalyModel
from patchaudit.workers.pipeline import ImageResult


def heatmap_key(image_uri: str) -> str:
    return f"heatmaps/{hashlib.sha256(image_uri.encode()).hexdigest()[:24]}.png"


def build_rows(
    results: Sequence[ImageResult],
    infos: Mapping[str, ObjectInfo],
    run_id: str,
    model: AnomalyModel,
    attempt: int,
    worker: str,
    heatmap_store: ObjectStore | None = None,
) -> list[dict[str, Any]]:
    """One row per result. `infos` maps each key to its listing entry (uri, size, etag).

    Heatmaps are written for anomalous images when `heatmap_store` is given and the result kept its map.
    """
    lo, hi = model.heat_scale()
    rows = []
    for r in results:
        info = infos[r.key]
        row: dict[str, Any] = {
            "run_id": run_id,
            "image_uri": info.uri,
            "size": info.size,
            "etag": info.etag,
            "model_id": model.model_id,
            "threshold": model.threshold,
            "attempt": attempt,
            "worker": worker,
            "decode_ms": r.decode_ms,
            "error": r.error,
        }
        if r.error is None:
            row["score"] = r.score
            row["is_anomalous"] = r.is_anomalous
            row["feature_ms"] = r.feature_ms
            row["knn_ms"] = r.knn_ms if model.needs_index else None
            if r.stats is not None:
                row.update(
                    map_max=r.stats.map_max,
                    map_mean=r.stats.map_mean,
                    anomalous_area_fraction=r.stats.anomalous_area_fraction,
                    peak_x=r.stats.peak_x,
                    peak_y=r.stats.peak_y,
                )
            if heatmap_store is not None and r.is_anomalous and r.amap is not None:
                key = heatmap_key(info.uri)
                pixels = r.image.pixels if r.image is not None else None
                heatmap_store.write_bytes(key, heatmap_png(r.amap, lo, hi, image=pixels))
                row["heatmap_uri"] = heatmap_store.uri_for(key)
        rows.append(row)
    return rows


def build_embeddings(results: Sequence[ImageResult], infos: Mapping[str, ObjectInfo], model: AnomalyModel) -> Any:
    """The batch's embeddings table (store.embeddings) for its scored images; None when none has one.

    Written before the batch's report part, which is the commit (see store.embeddings).
    """
    import numpy as np

    from patchaudit.store.embeddings import embeddings_table
    from patchaudit.workers.embeddings import embedding_space

    with_vec = [r for r in results if r.error is None and r.pooled is not None]
    if not with_vec:
        return None
    pooled = np.stack([r.pooled for r in with_vec if r.pooled is not None])
    peaks = [r.peak for r in with_vec]
    peak = np.stack([p for p in peaks if p is not None]) if all(p is not None for p in peaks) else None
    return embeddings_table([infos[r.key].uri for r in with_vec], pooled, peak, embedding_space(model))
