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
from typing import Any, cast

import numpy as np
import torch

from patchaudit.errors import PatchauditError
from patchaudit.workers.decode import DecodedImage, Preprocess

# Decoded and decode_many live with the decode stage (torch-free, for the decode actors); imported here
# too because the scoring path and its callers use them under these names.
from patchaudit.workers.decode_stage import Decoded, _decode_one, decode_many  # noqa: F401
from patchaudit.workers.features import to_tensor_batch
from patchaudit.workers.geometry import group_by_shape
from patchaudit.workers.maps import MapStats, MapStatsCollector, smooth_maps, to_original_tensor
from patchaudit.workers.model import AnomalyModel
from patchaudit.workers.tiling import cut_tiles, stitch, tile_boxes


@dataclass
class ImageResult:
    key: str
    score: float | None = None
    is_anomalous: bool | None = None
    stats: MapStats | None = None
    amap: np.ndarray | None = None  # (H, W) float32, only when keep_maps
    image: DecodedImage | None = field(default=None, repr=False)  # only when keep_images
    error: str | None = None
    pooled: np.ndarray | None = field(default=None, repr=False)  # (D,) float16, only when embeddings
    peak: np.ndarray | None = field(default=None, repr=False)  # (D,) float16, None without a map
    decode_ms: float = 0.0
    feature_ms: float = 0.0
    knn_ms: float = 0.0


def _read_one(read: Callable[[str], bytes], key: str) -> tuple[bytes | None, str | None, float]:
    t0 = time.perf_counter()
    try:
        return read(key), None, (time.perf_counter() - t0) * 1e3
    except PatchauditError as exc:  # missing object, store failure after its own retries
        return None, f"read failed: {exc}", (time.perf_counter() - t0) * 1e3


def decode_batches_gpu(
    read: Callable[[str], bytes],
    keys: Sequence[str],
    prep: Preprocess,
    batch_size: int,
    device: torch.device,
    threads: int = 2,
    max_pixels: int = 100_000_000,
) -> Iterator[list[Decoded]]:
    """Batches of `Decoded` with JPEGs decoded on `device` (workers.gpu_decode), the rest on the CPU.

    Reads run in a thread pool one batch ahead of the decode, so the store's latency overlaps the GPU.
    """
    from patchaudit.workers.gpu_decode import decode_batch

    chunks = [list(keys[i : i + batch_size]) for i in range(0, len(keys), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="read") as pool:
        pending = [pool.map(lambda k: _read_one(read, k), chunks[0])] if chunks else []
        for n, chunk in enumerate(chunks):
            reads = list(pending.pop(0))
            if n + 1 < len(chunks):
                pending.append(pool.map(lambda k: _read_one(read, k), chunks[n + 1]))
            t0 = time.perf_counter()
            ok = [i for i, (data, _, _) in enumerate(reads) if data is not None]
            decoded = decode_batch([reads[i][0] for i in ok], prep, device, max_pixels)  # type: ignore[misc]
            per_image_ms = (time.perf_counter() - t0) * 1e3 / max(1, len(ok))
            out: list[Decoded] = []
            got = dict(zip(ok, decoded))
            for i, (key, (_, error, read_ms)) in enumerate(zip(chunk, reads)):
                res = got.get(i)
                if isinstance(res, DecodedImage):
                    out.append(Decoded(key, res, None, read_ms + per_image_ms))
                else:
                    out.append(Decoded(key, None, error or res, read_ms + per_image_ms))
            yield out


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def input_batches(model: AnomalyModel, images: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
    """Normalised backbone batches (B, 3, h, w) of decoded images, as the model's geometry cuts them:
    one batch per input shape (squash: one shape; aspect: one per shape), or the tiles of all images in
    batches of `model.config.batch_size` (tile). Fit uses it, so a model is fitted on what it scores."""
    mean, std, dev = model.backbone.mean, model.backbone.std, model.device
    if model.config.geometry == "tile":
        tiles = [t for px in images for t in _tiles_of(model, px)[1]]
        for k in range(0, len(tiles), model.config.batch_size):
            yield to_tensor_batch(tiles[k : k + model.config.batch_size], mean, std, dev)
        return
    for group in group_by_shape([px.shape for px in images]):
        reason = model.check_input(images[group[0]].shape[:2])
        if reason is not None:
            raise ShapeError(reason)
        yield to_tensor_batch([images[i] for i in group], mean, std, dev)


class ShapeError(PatchauditError):
    """The model cannot take an input of this shape (e.g. PaDiM fitted on another patch grid)."""


def _tiles_of(model: AnomalyModel, pixels: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    c = model.config
    boxes = tile_boxes(pixels.shape[0], pixels.shape[1], c.tile_size, c.tile_overlap, model.stride)
    return boxes, cut_tiles(pixels, boxes, c.tile_size)


@dataclass
class _Scored:
    score: float | None = None
    smap: torch.Tensor | None = None  # (H_in, W_in) smoothed map on the input pixels, None without maps
    error: str | None = None
    pooled: np.ndarray | None = None  # mining embedding (workers.embeddings), only when asked for
    peak: np.ndarray | None = None


def _embeddings(model: AnomalyModel, emb: Any, maps: torch.Tensor | None) -> Any:
    from patchaudit.workers.embeddings import compute

    return compute(model, emb, maps)


def _score_resized(
    model: AnomalyModel, images: Sequence[np.ndarray], index: Any, embeddings: bool = False
) -> tuple[list[_Scored], float]:
    """squash / aspect: one backbone pass per input shape; (per-image results, k-NN ms)."""
    out: list[_Scored] = [_Scored() for _ in images]
    knn_ms = 0.0
    b = model.backbone
    for group in group_by_shape([px.shape for px in images]):
        shape = images[group[0]].shape[:2]
        reason = model.check_input(shape)
        if reason is not None:
            for i in group:
                out[i].error = reason
            continue
        x = to_tensor_batch([images[i] for i in group], b.mean, b.std, model.device)
        emb = model.embed(x)
        scored = model.score_embeddings(emb, index)
        knn_ms += scored.knn_ms
        smaps = None if scored.grid_maps is None else smooth_maps(scored.grid_maps, shape, model.config.map_sigma)
        vecs = _embeddings(model, emb, smaps if smaps is not None else scored.grid_maps) if embeddings else None
        for j, i in enumerate(group):
            out[i].score = float(scored.image_scores[j])
            out[i].smap = None if smaps is None else smaps[j]
            if vecs is not None:
                out[i].pooled = vecs.pooled[j]
                out[i].peak = None if vecs.peak is None else vecs.peak[j]
    return out, knn_ms


def _score_tiled(
    model: AnomalyModel, images: Sequence[np.ndarray], index: Any, embeddings: bool = False
) -> tuple[list[_Scored], float]:
    """tile: every tile of every image scored, in batches of `batch_size` tiles; maps stitched per image
    (overlapping patch cells averaged), then smoothed; the image score from the stitched map.
    Embeddings: pooled = the mean of the tiles' pooled vectors, peak = the peak feature of the tile whose
    own map is highest."""
    c, b = model.config, model.backbone
    cut = [_tiles_of(model, px) for px in images]
    tiles = [t for _, ts in cut for t in ts]
    scores, grids, knn_ms = [], [], 0.0
    pooled, peaks = [], []
    for k in range(0, len(tiles), c.batch_size):
        x = to_tensor_batch(tiles[k : k + c.batch_size], b.mean, b.std, model.device)
        emb = model.embed(x)
        scored = model.score_embeddings(emb, index)
        knn_ms += scored.knn_ms
        scores.append(np.asarray(scored.image_scores))
        if scored.grid_maps is not None:
            grids.append(scored.grid_maps)
        if embeddings:
            vecs = _embeddings(model, emb, scored.grid_maps)
            pooled.append(vecs.pooled)
            peaks.append(vecs.peak)
    tile_scores = np.concatenate(scores)
    all_grids = torch.cat(grids) if grids else None
    tile_pooled = np.concatenate(pooled) if pooled else None
    tile_peak = np.concatenate(peaks) if peaks and all(p is not None for p in peaks) else None
    out, pos = [], 0
    for px, (boxes, _) in zip(images, cut):
        n = len(boxes)
        if all_grids is None:  # image-level method: the most anomalous tile
            res = _Scored(score=float(tile_scores[pos : pos + n].max()))
        else:
            g = all_grids[pos : pos + n]  # (n, gh, gw)
            cell = c.tile_size // g.shape[1]
            stitched = stitch(g, boxes, cell, px.shape[:2])  # (H/cell, W/cell)
            smap = smooth_maps(stitched[None], px.shape[:2], c.map_sigma)[0]
            res = _Scored(score=model.map_image_score(stitched, smap), smap=smap)
        if tile_pooled is not None:
            mean = tile_pooled[pos : pos + n].astype(np.float32).mean(0)
            res.pooled = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float16)
            if tile_peak is not None:
                res.peak = tile_peak[pos + int(np.argmax(tile_scores[pos : pos + n]))]
        out.append(res)
        pos += n
    return out, knn_ms


def score_decoded(
    model: AnomalyModel,
    items: Sequence[Decoded],
    index: Any = None,
    keep_maps: bool | str = False,
    keep_images: bool = False,
    embeddings: bool = False,
) -> list[ImageResult]:
    """Score one batch; decode failures pass through as error results in the same order.

    embeddings: also compute each scored image's mining embedding (workers.embeddings: pooled and peak
    feature, float16) from the features already extracted.

    keep_maps: True keeps every full-resolution map on the result (`amap`, host numpy), "anomalous" only those
    of images at or above the threshold (the ones that get heatmaps), False none. Map statistics are computed
    where the maps are (on a GPU, only they and the kept maps are copied back). An image the model cannot
    take (see `AnomalyModel.check_input`) becomes an error result with the reason.
    """
    if keep_maps not in (True, False, "anomalous"):
        raise ValueError(f"keep_maps must be True, False or 'anomalous', not {keep_maps!r}")
    good_pos = [i for i, it in enumerate(items) if it.image is not None]
    good = [items[i] for i in good_pos]
    results: dict[int, ImageResult] = {}  # by position: the same key may appear twice
    if good:
        t0 = time.perf_counter()
        images = [cast(DecodedImage, it.image) for it in good]  # the decoded ones
        pixels = [im.pixels for im in images]
        score = _score_tiled if model.config.geometry == "tile" else _score_resized
        scored, knn_ms = score(model, pixels, index, embeddings)
        n = len(good)
        feature_ms = ((time.perf_counter() - t0) * 1e3 - knn_ms) / n
        t3 = time.perf_counter()
        squash = model.config.geometry == "squash"
        collector = MapStatsCollector(model.threshold)
        with_maps: list[int] = []
        kept: dict[int, np.ndarray] = {}
        for j, s in enumerate(scored):
            if s.error is not None or s.smap is None:
                continue
            # one full-resolution map at a time; only the kept ones outlive the loop
            resized = model.config.image_size if squash else tuple(images[j].pixels.shape[:2])
            amap = to_original_tensor(
                s.smap, images[j].original_size, resized, model.config.center_crop if squash else None
            )
            collector.add(amap)
            with_maps.append(j)
            if keep_maps is True or (keep_maps == "anomalous" and cast(float, s.score) >= model.threshold):
                kept[j] = amap.cpu().numpy()
        stats = dict(zip(with_maps, collector.result()))
        for j, (it, s) in enumerate(zip(good, scored)):
            if s.error is not None:
                results[good_pos[j]] = ImageResult(it.key, error=s.error, decode_ms=it.decode_ms)
                continue
            results[good_pos[j]] = ImageResult(
                it.key,
                score=s.score,
                is_anomalous=bool(cast(float, s.score) >= model.threshold),
                stats=stats.get(j),
                amap=kept.get(j),
                decode_ms=it.decode_ms,
                feature_ms=feature_ms,
                knn_ms=knn_ms / n,
                image=it.image if keep_images else None,
                pooled=s.pooled,
                peak=s.peak,
            )
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
    embeddings: bool = False,
) -> Iterator[ImageResult]:
    bs = batch_size or model.config.batch_size
    if model.device.type == "cuda" and model.config.gpu_jpeg:
        batches: Iterator[list[Decoded]] = decode_batches_gpu(
            read, list(keys), model.preprocess, bs, model.device, threads
        )
    else:
        batches = batched(decode_many(read, keys, model.preprocess, threads), bs)
    yield from score_batches(model, batches, index, keep_maps, keep_images, progress, embeddings)


def score_batches(
    model: AnomalyModel,
    batches: Iterable[Sequence[Decoded]],
    index: Any = None,
    keep_maps: bool | str = False,
    keep_images: bool = False,
    progress: Callable[[int], None] | None = None,
    embeddings: bool = False,
) -> Iterator[ImageResult]:
    """Score batches decoded elsewhere (`score_keys` decodes them itself; a cluster decode stage hands
    them over, workers/decode_actors.py): one `score_decoded` call per batch."""
    with torch.inference_mode():
        for batch in batches:
            yield from score_decoded(model, batch, index, keep_maps, keep_images, embeddings)
            if progress is not None:
                progress(len(batch))
