"""Fitting any method with the honest protocol: hold out defect-free images, calibrate on them.

The threshold is a quantile of the held-out normal images' scores (times a margin). Test images and
their labels are never seen here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from patchaudit.store.objects import ObjectStore
from patchaudit.workers.config import ModelConfig
from patchaudit.workers.datasets import DatasetError
from patchaudit.workers.model import AnomalyModel, backbone_for, resolve_device
from patchaudit.workers.registry import model_class
from patchaudit.workers.pipeline import batched, decode_many, input_batches, score_keys

Progress = Callable[[str, int], Callable[[int], None]]  # (stage, total) -> advance(n)


def split_calibration(keys: Sequence[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of sorted keys into (fit, calibration); calibration gets round(holdout*n), >= 1."""
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


def fit_model(
    config: ModelConfig,
    store: ObjectStore,
    keys: Sequence[str],
    progress: Progress | None = None,
    threads: int = 2,
) -> tuple[AnomalyModel, dict[str, Any]]:
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    fit_keys, cal_keys = split_calibration(keys, config.calibration.holdout, config.seed)
    t0 = time.perf_counter()
    model = model_class(config.method)(config, backbone_for(config, device))
    errors: list[tuple[str, str]] = []
    t_load = time.perf_counter() - t0
    with torch.inference_mode():
        model.fit(train_batches(model, store, fit_keys, threads, errors),
                  progress("features", len(fit_keys)) if progress else None)
    t_fit = time.perf_counter()
    cal_results = list(
        score_keys(model, store.read_bytes, cal_keys, threads=threads,
                   progress=progress("calibrate", len(cal_keys)) if progress else None)
    )
    errors.extend((r.key, r.error) for r in cal_results if r.error)
    cal_scores = np.array([r.score for r in cal_results if r.error is None], dtype=np.float64)
    if cal_scores.size == 0:
        raise DatasetError("no calibration image could be decoded: cannot set a threshold")
    cal = config.calibration
    model.threshold = float(np.quantile(cal_scores, cal.quantile) * cal.margin)
    model.calibration = {
        "n_images": int(cal_scores.size),
        "quantile": cal.quantile,
        "margin": cal.margin,
        "score_min": float(cal_scores.min()),
        "score_median": float(np.median(cal_scores)),
        "score_max": float(cal_scores.max()),
    }
    info = {
        "n_fit_images": len(fit_keys) - sum(1 for k, _ in errors if k in set(fit_keys)),
        "n_calibration_images": int(cal_scores.size),
        "backbone_load_s": t_load,
        "fit_s": t_fit - t0 - t_load,
        "calibration_s": time.perf_counter() - t_fit,
        "total_s": time.perf_counter() - t0,
        "errors": [{"key": k, "error": e} for k, e in errors],
        **getattr(model, "fit_timings", {}),
    }
    model.extra_manifest["fit"] = {k: v for k, v in info.items() if k != "errors"} | {"n_errors": len(errors)}
    return model, info
