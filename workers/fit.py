"""Fitting any method with the honest protocol: every defect-free training image fits the model and,
by k-fold cross-fitting, calibrates its threshold (workers/calibration.py).

The backbone runs once per image; each fold refits only the method's statistics from the stored
embeddings, then the final model is fitted on all images. Test images and their labels are never
seen here.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from patchaudit.store.objects import ObjectStore
from patchaudit.workers.calibration import (
    batches_of,
    conformal_threshold,
    cross_fit_scores,
    fold_ids,
    join_images,
    split_images,
    summarize,
)
from patchaudit.workers.config import ModelConfig
from patchaudit.workers.datasets import DatasetError
from patchaudit.workers.geometry import group_by_shape
from patchaudit.workers.model import AnomalyModel, backbone_for, resolve_device
from patchaudit.workers.pipeline import batched, decode_many, input_batches, score_keys
from patchaudit.workers.registry import model_class

Progress = Callable[[str, int], Callable[[int], None]]  # (stage, total) -> advance(n)


def split_calibration(keys: Sequence[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of sorted keys into (fit, calibration); calibration gets round(holdout*n), >= 1.

    The single held-out slice of earlier versions; `fit` no longer uses it (benchmarks/calibration.py
    measures it against cross-fitting).
    """
    keys = sorted(keys)
    if len(keys) < 2:
        raise DatasetError(f"need at least 2 defect-free images to fit and calibrate, got {len(keys)}")
    n_cal = min(len(keys) - 1, max(1, int(round(holdout * len(keys)))))
    perm = np.random.default_rng(seed).permutation(len(keys))
    cal = sorted(keys[i] for i in perm[:n_cal])
    fit = sorted(keys[i] for i in perm[n_cal:])
    return fit, cal


def train_batches(
    model: AnomalyModel, store: ObjectStore, keys: Sequence[str], threads: int, errors: list[tuple[str, str]]
) -> Iterator[torch.Tensor]:
    """Normalised (B, 3, H, W) batches of the images under `keys`, decoded in a thread pool, on the
    model's device, cut as the model's geometry says (one batch per input shape, or tiles);
    images that fail to decode are left out and appended to `errors` as (key, reason)."""
    config = model.config
    for batch in batched(decode_many(store.read_bytes, keys, model.preprocess, threads), config.batch_size):
        ok = [d for d in batch if d.image is not None]
        errors.extend((d.key, d.error) for d in batch if d.image is None)
        if ok:
            yield from input_batches(model, [d.image.pixels for d in ok])


def embed_images(
    model: AnomalyModel,
    store: ObjectStore,
    keys: Sequence[str],
    threads: int,
    errors: list[tuple[str, str]],
    advance: Callable[[int], None] | None = None,
) -> tuple[list[str], list[Any]]:
    """(keys, per-image embeddings on the CPU) of the images that decode, in key order. Each embedding
    has a leading dimension of the image's backbone inputs: 1, or its tile count with geometry tile."""
    config = model.config
    out_keys: list[str] = []
    items: list[Any] = []
    cpu = torch.device("cpu")
    for batch in batched(decode_many(store.read_bytes, keys, model.preprocess, threads), config.batch_size):
        ok = [d for d in batch if d.image is not None]
        errors.extend((d.key, d.error) for d in batch if d.image is None)
        pixels = [d.image.pixels for d in ok]
        per: list[Any] = [None] * len(ok)
        if config.geometry == "tile":
            for i, px in enumerate(pixels):  # an image's tiles, in batches of batch_size
                per[i] = join_images([model.embed(x) for x in input_batches(model, [px])], cpu)
        else:
            for group in group_by_shape([px.shape for px in pixels]):
                for x in input_batches(model, [pixels[i] for i in group]):  # one batch: this shape
                    for i, emb in zip(group, split_images(model.embed(x))):
                        per[i] = emb
        out_keys.extend(d.key for d in ok)
        items.extend(per)
        if advance is not None:
            advance(len(batch))
    return out_keys, items


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def concurrent_fits(configured: int, fit_threads: int | None, jobs: int) -> int:
    """How many fits cross-fitting runs at once: the configured number, or (0) as many as this process's
    cores hold when one fit keeps `fit_threads` of them busy (None: it uses them all, so one)."""
    if configured:
        return max(1, min(configured, jobs))
    if not fit_threads:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(jobs, cores // fit_threads))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to n for the block (None: unchanged). Process-wide, so concurrent
    fits share one setting instead of each raising and restoring it."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_model(
    config: ModelConfig,
    store: ObjectStore,
    keys: Sequence[str],
    progress: Progress | None = None,
    threads: int = 2,
) -> tuple[AnomalyModel, dict[str, Any]]:
    """Fit `config.method` on the images under `keys`; the threshold comes from cross-fitting them."""
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    keys = sorted(keys)
    if len(keys) < 2:
        raise DatasetError(f"need at least 2 defect-free images to fit and calibrate, got {len(keys)}")
    t0, c0 = time.perf_counter(), _cpu_s()
    backbone = backbone_for(config, device)
    cls = model_class(config.method)

    def make_model() -> AnomalyModel:
        torch.manual_seed(config.seed)  # every fold model starts as the final one does
        return cls(config, backbone)

    model = make_model()
    errors: list[tuple[str, str]] = []
    t_load = time.perf_counter() - t0
    with torch.inference_mode():
        fit_keys, items = embed_images(
            model, store, keys, threads, errors, progress("features", len(keys)) if progress else None
        )
    if len(items) < 2:
        raise DatasetError(f"{len(items)} training image(s) could be decoded: need at least 2 to fit and calibrate")
    t_feat = time.perf_counter()
    cal = config.calibration
    folds = fold_ids(len(items), cal.folds, config.seed)
    n_folds = int(folds.max()) + 1

    def score_tiled(fold_model: AnomalyModel, held: np.ndarray) -> np.ndarray:
        # a tiled image's score comes from its stitched map: score it as `score` does (decoded again)
        res = list(score_keys(fold_model, store.read_bytes, [fit_keys[i] for i in held], threads=threads))
        bad = [r for r in res if r.error is not None]
        if bad:
            raise DatasetError(f"calibration image {bad[0].key} could not be scored: {bad[0].error}")
        return np.array([r.score for r in res], dtype=np.float64)

    advance = progress("cross-fit", n_folds) if progress else None
    concurrent = concurrent_fits(cal.concurrent_fits, model.fit_threads(), n_folds + 1)
    final_s: list[float] = []

    def fit_final() -> None:
        t = time.perf_counter()
        with torch.inference_mode():
            model.fit_embedded(batches_of(items, config.batch_size, model.device))
        final_s.append(time.perf_counter() - t)

    score = score_tiled if config.geometry == "tile" else None
    with torch_threads(model.fit_threads() if concurrent > 1 else None):
        oos = cross_fit_scores(make_model, items, folds, config.batch_size, advance, score, concurrent, fit_final)
    t_fit = time.perf_counter()
    t_cal = t_fit - final_s[0] if concurrent <= 1 else t_fit  # concurrent: the final fit ran inside the pool
    threshold, attainable = conformal_threshold(oos, cal.target_fpr)
    model.threshold = threshold * cal.margin
    model.calibration = summarize(oos, model.threshold, cal.target_fpr, n_folds, cal.margin, attainable)
    info = {
        "n_fit_images": len(items),
        "n_calibration_images": len(items),
        "backbone_load_s": t_load,
        "features_s": t_feat - t0 - t_load,
        # the fold models: their fits and out-of-sample scores (concurrent: with the final model's fit)
        "calibration_s": t_cal - t_feat,
        "fit_s": final_s[0],  # the final model from the stored embeddings (its own duration)
        "concurrent_fits": concurrent,
        "total_s": time.perf_counter() - t0,
        "total_cpu_s": _cpu_s() - c0,
        "errors": [{"key": k, "error": e} for k, e in errors],
        **getattr(model, "fit_timings", {}),
        "calibration": model.calibration,
    }
    model.extra_manifest["fit"] = {k: v for k, v in info.items() if k not in ("errors", "calibration")} | {
        "n_errors": len(errors)
    }
    return model, info
