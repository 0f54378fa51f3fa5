"""The scoring path shared by `fit` calibration, `eval`, `score` and the Ray feature workers.

decode (thread pool, so PNG/JPEG decoding overlaps the backbone) -> batch -> embed -> method scores ->
smoothed full-resolution maps -> per-image statistics. A bad object becomes an `ImageResult` with an
error, never an exception that stops the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from patchaudit.errors import PatchauditError
from patchaudit.workers.decode import DecodedImage, DecodeError, Preprocess, decode_image
from patchaudit.workers.features import to_tensor_batch
from patchaudit.workers.maps import MapStats, MapStatsCollector, smooth_maps, to_original_tensor
from patchaudit.workers.model import AnomalyModel


@dataclass
class Decoded:
    key: str
    image: DecodedImage | None
    error: str | None
    decode_ms: float


@dataclass
class ImageResult:
    key: str
    score: float | None = None
    is_anomalous: bool | None = None
    stats: MapStats | None = None
    amap: np.ndarray | None = None  # (H, W) float32, only when keep_maps
    image: DecodedImage | None = field(default=None, repr=False)  # only when keep_images
    error: str | None = None
    decode_ms: float = 0.0
    feature_ms: float = 0.0
    knn_ms: float = 0.0


def _decode_one(read: Callable[[str], bytes], key: str, prep: Preprocess, max_pixels: int) -> Decoded:
    t0 = time.perf_counter()
    try:
        data = read(key)
        img = decode_image(data, prep, max_pixels)
        return Decoded(key, img, None, (time.perf_counter() - t0) * 1e3)
    except DecodeError as exc:
        return Decoded(key, None, str(exc), (time.perf_counter() - t0) * 1e3)
    except PatchauditError as exc:  # missing object, store failure after its own retries
        return Decoded(key, None, f"read failed: {exc}", (time.perf_counter() - t0) * 1e3)


def decode_many(
    read: Callable[[str], bytes],
    keys: Iterable[str],
    prep: Preprocess,
    threads: int = 2,
    prefetch: int = 64,
    max_pixels: int = 100_000_000,
) -> Iterator[Decoded]:
    """Decode `keys` in a thread pool, yielding in input order with at most `prefetch` in flight."""
    keys = list(keys)
    if threads <= 1:
        for k in keys:
            yield _decode_one(read, k, prep, max_pixels)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending = []
        it = iter(keys)
        for k in it:
            pending.append(pool.submit(_decode_one, read, k, prep, max_pixels))
            if len(pending) >= prefetch:
                break
        while pending:
            yield pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_decode_one, read, nxt, prep, max_pixels))


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_decoded(
    model: AnomalyModel,
    items: Sequence[Decoded],
    index: Any = None,
    keep_maps: bool | str = False,
    keep_images: bool = False,
) -> list[ImageResult]:
    """Score one batch; decode failures pass through as error results in the same order.

    keep_maps: True keeps every full-resolution map on the result (`amap`, host numpy), "anomalous" only those
    of images at or above the threshold (the ones that get heatmaps), False none. Map statistics are computed
    where the maps are (on a GPU, only they and the kept maps are copied back).
    """
    if keep_maps not in (True, False, "anomalous"):
        raise ValueError(f"keep_maps must be True, False or 'anomalous', not {keep_maps!r}")
    good_pos = [i for i, it in enumerate(items) if it.image is not None]
    good = [items[i] for i in good_pos]
    results: dict[int, ImageResult] = {}  # by position: the same key may appear twice
    if good:
        t0 = time.perf_counter()
        x = to_tensor_batch([it.image.pixels for it in good], model.backbone.mean, model.backbone.std, model.device)
        emb = model.embed(x)
        t1 = time.perf_counter()
        scored = model.score_embeddings(emb, index)
        t2 = time.perf_counter()
        smaps = None
        if scored.grid_maps is not None:
            smaps = smooth_maps(scored.grid_maps, model.preprocess.input_size, model.config.map_sigma)
        n = len(good)
        feature_ms = ((t1 - t0) * 1e3 + (t2 - t1) * 1e3 - scored.knn_ms) / n
        t3 = time.perf_counter()
        anomalous = [bool(s >= model.threshold) for s in scored.image_scores]
        kept: dict[int, np.ndarray] = {}
        stats: list[MapStats] = []
        if smaps is not None:  # one full-resolution map at a time; only the kept ones outlive the loop
            collector = MapStatsCollector(model.threshold)
            for j, it in enumerate(good):
                amap = to_original_tensor(smaps[j], it.image.original_size, model.config.image_size,
                                          model.config.center_crop)
                collector.add(amap)
                if keep_maps is True or (keep_maps == "anomalous" and anomalous[j]):
                    kept[j] = amap.cpu().numpy()
            stats = collector.result()
        for j, it in enumerate(good):
            res = ImageResult(
                it.key,
                score=float(scored.image_scores[j]),
                is_anomalous=anomalous[j],
                decode_ms=it.decode_ms,
                feature_ms=feature_ms,
                knn_ms=scored.knn_ms / n,
                image=it.image if keep_images else None,
            )
            if stats:
                res.stats = stats[j]
                res.amap = kept.get(j)
            results[good_pos[j]] = res
        maps_ms = (time.perf_counter() - t3) * 1e3 / n
        for r in results.values():
            r.feature_ms += maps_ms  # upsampling/blur counted with the features stage
    return [
        results[i] if it.image is not None else ImageResult(it.key, error=it.error, decode_ms=it.decode_ms)
        for i, it in enumerate(items)
    ]


def score_keys(
    model: AnomalyModel,
    read: Callable[[str], bytes],
    keys: Sequence[str],
    index: Any = None,
    batch_size: int | None = None,
    threads: int = 2,
    keep_maps: bool | str = False,
    keep_images: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Iterator[ImageResult]:
    bs = batch_size or model.config.batch_size
    with torch.inference_mode():
        for batch in batched(decode_many(read, keys, model.preprocess, threads), bs):
            yield from score_decoded(model, batch, index, keep_maps, keep_images)
            if progress is not None:
                progress(len(batch))
