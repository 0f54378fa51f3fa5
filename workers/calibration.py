"""Thresholds that hold: k-fold cross-fitting over every defect-free training image.

The images are split into `folds` seeded folds. For each fold a model is fitted on the other folds
and scores the held-out one, so every image gets an out-of-sample score; the final model is then
fitted on all images. The threshold is the conformal (1 - target_fpr) order statistic of the
out-of-sample scores: with n scores it is the ceil((n + 1)(1 - target_fpr))-th smallest, which,
for a new defect-free image exchangeable with the training ones, is exceeded with probability at
most target_fpr. The final model has seen more normal images than each fold model, so its scores
on new good images tend to sit a little lower than the out-of-sample ones (the rate errs low).

Features are embedded once; each fold refits only the method's own statistics (PatchCore: a
coreset per fold; PaDiM/Gaussian: moments; SimpleNet: its small networks) from those embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from patchaudit.errors import ConfigError

Embedding = Any  # what AnomalyModel.embed returns for one image: a (1, ...) tensor or a list of them


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """(n,) fold number of each of n items (in the caller's order): seeded, sizes differ by at most one."""
    if n < 2:
        raise ConfigError(f"cross-fitting needs at least 2 defect-free images, got {n}")
    k = min(folds, n)
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[perm] = np.arange(n) % k
    return out


def conformal_threshold(scores: np.ndarray, target_fpr: float) -> tuple[float, bool]:
    """(threshold, attainable): the ceil((n+1)(1-target))-th smallest score.

    When (n + 1)(1 - target) > n the target is below what n images can vouch for (fewer than
    1/target - 1 images); the threshold is then the largest score and `attainable` is False.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = s.size
    rank = math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)
    attainable = rank <= n
    return float(s[min(max(rank, 1), n) - 1]), attainable


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval of a rate observed as k of n."""
    from scipy.stats import beta

    a = (1.0 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def split_images(emb: Embedding) -> list[Embedding]:
    """A batch embedding (tensor (B, ...) or list of tensors) -> B per-image embeddings on the CPU."""
    if isinstance(emb, torch.Tensor):
        return list(emb.detach().cpu().split(1))
    parts = [e.detach().cpu().split(1) for e in emb]
    return [list(p) for p in zip(*parts)]


def join_images(items: Sequence[Embedding], device: torch.device) -> Embedding:
    """Per-image embeddings -> one batch embedding on `device` (the inverse of split_images)."""
    if isinstance(items[0], torch.Tensor):
        return torch.cat(list(items)).to(device)
    return [torch.cat([it[i] for it in items]).to(device) for i in range(len(items[0]))]


def _shape_key(item: Embedding) -> tuple:
    if isinstance(item, torch.Tensor):
        return tuple(item.shape[1:])
    return tuple(tuple(t.shape[1:]) for t in item)


def shape_groups(items: Sequence[Embedding], size: int) -> list[list[int]]:
    """Positions of `items` in batches of at most `size` images of one embedding shape (geometry aspect
    gives several shapes; an image's leading dimension is its input count, 1 or its tiles)."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(_shape_key(it), []).append(i)
    return [g[k : k + size] for g in groups.values() for k in range(0, len(g), size)]


def batches_of(items: Sequence[Embedding], size: int, device: torch.device) -> Iterator[Embedding]:
    for group in shape_groups(items, size):
        yield join_images([items[i] for i in group], device)


def score_from_embeddings(model: Any, items: Sequence[Embedding], batch_size: int) -> np.ndarray:
    """(n,) image scores of per-image embeddings (one input each), as scoring computes them untiled."""
    scores = np.full(len(items), np.nan, dtype=np.float64)
    for group in shape_groups(items, batch_size):
        emb = join_images([items[i] for i in group], model.device)
        scores[group] = np.asarray(model.score_embeddings(emb).image_scores, dtype=np.float64)
    return scores


Scorer = Callable[[Any, np.ndarray], np.ndarray]  # (fold model, held-out positions) -> their image scores


def cross_fit_scores(
    make_model: Callable[[], Any],
    items: Sequence[Embedding],
    folds: np.ndarray,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
    score: Scorer | None = None,
    concurrent: int = 1,
    alongside: Callable[[], None] | None = None,
) -> np.ndarray:
    """(n,) out-of-sample image scores: fold j's images scored by a model fitted on the other folds.

    `score` defaults to scoring the stored embeddings; a caller whose image score needs more than one
    input per image (tiles stitched into one map) passes its own. `concurrent` > 1 fits that many fold
    models at once in threads (for methods whose fit keeps one core busy): the models are built first,
    one after another, so seeded construction does not depend on timing. `alongside` (the final model's
    fit) runs after the folds, or in the same pool when concurrent.
    """
    scores = np.full(len(items), np.nan, dtype=np.float64)

    def one(j: int, model: Any) -> None:
        train = [it for it, f in zip(items, folds) if f != j]
        held = np.flatnonzero(folds == j)
        with torch.inference_mode():
            model.fit_embedded(batches_of(train, batch_size, model.device))
            if score is None:
                scores[held] = score_from_embeddings(model, [items[int(i)] for i in held], batch_size)
            else:
                scores[held] = score(model, held)
        if advance is not None:
            advance(1)

    fold_list = [int(j) for j in np.unique(folds)]
    if concurrent <= 1:
        for j in fold_list:
            one(j, make_model())  # built right before its fit: the seeded sequence of earlier versions
        if alongside is not None:
            alongside()
        return scores
    models = {j: make_model() for j in fold_list}
    with ThreadPoolExecutor(max_workers=concurrent, thread_name_prefix="cross-fit") as pool:
        jobs = [pool.submit(one, j, models.pop(j)) for j in fold_list]
        if alongside is not None:
            jobs.append(pool.submit(alongside))
        for job in jobs:
            job.result()  # the first failure, raised here
    return scores


def summarize(
    scores: np.ndarray, threshold: float, target_fpr: float, folds: int, margin: float, attainable: bool
) -> dict[str, Any]:
    """The calibration record kept in the model manifest and printed by `fit`."""
    n = int(scores.size)
    flagged = int((scores >= threshold).sum())
    lo, hi = clopper_pearson(flagged, n)
    return {
        "method": "cross-fit",
        "folds": int(folds),
        "n_images": n,
        "target_fpr": target_fpr,
        "margin": margin,
        "target_attainable": attainable,
        # share of the out-of-sample scores at or above the threshold, with its exact 95% interval:
        # the estimate of the rate of good images the threshold flags
        "estimated_fpr": flagged / n,
        "estimated_fpr_ci95": [lo, hi],
        "score_min": float(scores.min()),
        "score_median": float(np.median(scores)),
        "score_max": float(scores.max()),
    }
