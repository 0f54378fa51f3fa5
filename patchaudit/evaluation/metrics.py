"""Evaluation metrics for anomaly detection: image/pixel AUROC, AUPRO, F1 (MVTec AD style).

Pure numpy + scipy.ndimage. Pixel metrics never build per-threshold binary maps: the normal
pixel scores are sorted once and every other count comes from `np.searchsorted` on that array,
so 100 maps of 900x900 take seconds and hold about one copy of the normal scores in memory.

Conventions shared by every function here:
- labels / masks: 1 (nonzero) = anomalous, 0 = good.
- higher score = more anomalous; a sample is predicted anomalous when `score >= threshold`.
- metrics computed with test labels are only ever reported; nothing here picks a threshold
  except `best_f1`, which is an oracle (see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from patchaudit.errors import PatchauditError

__all__ = [
    "MetricError",
    "EvalRecord",
    "auroc",
    "roc_curve",
    "pixel_auroc",
    "aupro",
    "f1_at_threshold",
    "best_f1",
    "evaluate",
]

# 8-connectivity, as in the official MVTec AD evaluation code (generic_util.compute_pro uses
# `structure = np.ones((3, 3))`): diagonally touching defect pixels form one region.
_REGION_STRUCTURE = np.ones((3, 3), dtype=int)


class MetricError(PatchauditError, ValueError):
    """Inputs for which a metric is undefined or malformed (one class only, shape mismatch, NaN)."""


# --------------------------------------------------------------------------- input checks


def _labels_1d(labels: Any) -> np.ndarray:
    """(N,) 0/1 or bool -> (N,) bool."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise MetricError(f"labels must be 1-D (N,), got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
            raise MetricError(f"labels must be 0 (good) or 1 (anomalous), got values {np.unique(arr)[:10]!r}")
    return arr.astype(bool, copy=False)


def _real_array(arr: Any, what: str) -> np.ndarray:
    """Numeric (int/float) array without NaN; NaN has no place in an ordering."""
    out = np.asarray(arr)
    if out.dtype == bool or not (np.issubdtype(out.dtype, np.integer) or np.issubdtype(out.dtype, np.floating)):
        raise MetricError(f"{what} must be a real numeric array, got dtype {out.dtype}")
    if np.issubdtype(out.dtype, np.floating) and np.isnan(out).any():
        raise MetricError(f"{what} contains NaN; scores must be comparable numbers")
    return out


def _labels_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _labels_1d(labels)
    s = _real_array(scores, "scores")
    if s.shape != y.shape:
        raise MetricError(f"scores shape {s.shape} must match labels shape {y.shape}")
    return y, s


def _both_classes(n_pos: int, n_neg: int, what: str) -> None:
    if n_pos == 0 or n_neg == 0:
        raise MetricError(
            f"{what} needs both classes, got {n_pos} anomalous and {n_neg} good; it is undefined with only one"
        )


def _image_pair(mask: Any, amap: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    """One image: (H, W) mask (nonzero = defect) -> bool, (H, W) anomaly map -> validated."""
    m = _real_array(amap, f"anomaly map #{i}")
    g = np.asarray(mask)
    if m.ndim != 2:
        raise MetricError(f"anomaly map #{i} must be 2-D (H, W), got shape {m.shape}; squeeze channel dims first")
    if g.shape != m.shape:
        raise MetricError(f"mask #{i} has shape {g.shape} but its anomaly map has shape {m.shape}")
    return g != 0, m


def _pairs(masks: Sequence[Any], maps: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(masks) != len(maps):
        raise MetricError(f"got {len(masks)} masks but {len(maps)} anomaly maps; need one mask per map")
    if len(maps) == 0:
        raise MetricError("no images: pixel metrics need at least one (mask, anomaly map) pair")
    return [_image_pair(g, m, i) for i, (g, m) in enumerate(zip(masks, maps))]


# --------------------------------------------------------------------------- ranking cores


def _auc_sorted(pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> float:
    """Mann-Whitney AUROC, ties count 1/2 (= average ranks, like sklearn's roc_auc_score)."""
    lt = np.searchsorted(neg_sorted, pos_sorted, side="left")  # negatives strictly below
    le = np.searchsorted(neg_sorted, pos_sorted, side="right")  # ... and tied
    # sum(lt + 0.5 * ties) / (P * N), kept in int64 until the last division
    num = int(lt.sum(dtype=np.int64)) + int(le.sum(dtype=np.int64))
    return num / (2.0 * pos_sorted.size * neg_sorted.size)


class _PixelScores(NamedTuple):
    neg: np.ndarray  # (Nn,) scores of normal pixels, ascending
    pos: np.ndarray  # (Np,) scores of defect pixels, ascending
    pos_w: np.ndarray  # (Np,) 1 / area of each defect pixel's region, same order as pos
    n_regions: int


def _collect(pairs: list[tuple[np.ndarray, np.ndarray]], regions: bool) -> _PixelScores:
    """Split every map into normal / defect pixel scores and sort them.

    The normal scores go into one preallocated buffer (the only large allocation); regions are
    connected components of each mask, labelled per image.
    """
    dtype = np.result_type(*(m.dtype for _, m in pairs))
    n_neg = sum(g.size - int(np.count_nonzero(g)) for g, _ in pairs)
    neg = np.empty(n_neg, dtype=dtype)
    pos_parts, w_parts, n_regions, at = [], [], 0, 0
    for g, m in pairs:
        k = g.size - int(np.count_nonzero(g))
        neg[at : at + k] = m[~g]
        at += k
        if k == g.size:  # empty mask: normal pixels only
            continue
        pos_parts.append(m[g])
        if regions:
            lab, n = ndimage.label(g, structure=_REGION_STRUCTURE)  # (H, W) int, 0 = background
            area = np.bincount(lab.ravel(), minlength=n + 1)
            w_parts.append(1.0 / area[lab[g]])  # same C order as m[g]
            n_regions += n
    neg.sort()
    pos = np.concatenate(pos_parts).astype(dtype, copy=False) if pos_parts else np.empty(0, dtype)
    if regions and pos.size:
        order = np.argsort(pos, kind="stable")
        return _PixelScores(neg, pos[order], np.concatenate(w_parts)[order], n_regions)
    pos.sort()
    return _PixelScores(neg, pos, np.empty(0), n_regions)


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x ascending) from x[0] to x_max, interpolating y at x_max.

    Same rule as the official MVTec `trapezoid`: every point with x <= x_max, plus the part of
    the next segment up to x_max.
    """
    ins = int(np.searchsorted(x, x_max, side="right"))  # first point beyond x_max
    area = float(np.sum(0.5 * (y[1:ins] + y[: ins - 1]) * np.diff(x[:ins])))
    if ins < x.size and x[ins - 1] < x_max:
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def _aupro_exact(s: _PixelScores, fpr_limit: float) -> float:
    """Exact normalised area under the PRO curve, every distinct score being a threshold.

    On the (FPR, PRO) curve only normal pixels move FPR, so the area is a sum over normal pixels:
    a normal pixel of score v adds (PRO(> v) + PRO(>= v)) / 2 / Nn (a tie group of c pixels is one
    trapezoid of width c / Nn). Swapping the sums gives per-defect-pixel counts of normal pixels,
    which are searchsorted lookups in the sorted normal scores.
    """
    neg, pos, w, n_regions = s
    n_neg = neg.size
    # smallest count of false positives whose FPR exceeds the limit (float compare, as official)
    cnt = min(int(math.floor(fpr_limit * n_neg)) + 1, n_neg + 1)
    while cnt > 1 and (cnt - 1) / n_neg > fpr_limit:
        cnt -= 1
    while cnt <= n_neg and cnt / n_neg <= fpr_limit:
        cnt += 1
    if cnt > n_neg:  # the whole curve lies within the limit
        base = 0  # count of normal pixels outside the fully included segments
        t_star = None
    else:
        t_star = neg[n_neg - cnt]  # score whose tie group crosses fpr_limit
        base = int(np.searchsorted(neg, t_star, side="right"))  # normal pixels <= t_star
    # for each defect pixel of score v: normal pixels in (t_star, v) and in (t_star, v]
    lt = np.searchsorted(neg, pos, side="left") - base
    le = np.searchsorted(neg, pos, side="right") - base
    np.maximum(lt, 0, out=lt)
    np.maximum(le, 0, out=le)
    area = float(np.dot(w, lt + le)) / (2.0 * n_neg * n_regions)
    if t_star is not None:  # partial trapezoid of the crossing tie group, cut at fpr_limit
        x0 = (n_neg - base) / n_neg
        x1 = (n_neg - int(np.searchsorted(neg, t_star, side="left"))) / n_neg
        y0 = float(w[np.searchsorted(pos, t_star, side="right") :].sum()) / n_regions
        y1 = float(w[np.searchsorted(pos, t_star, side="left") :].sum()) / n_regions
        y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (fpr_limit - x0)
    return min(area / fpr_limit, 1.0)


def _ceil_to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Smallest values of `dtype` >= `values`, so `score >= out` equals `score >= values` exactly.

    Keeps searchsorted from casting the big score array up to float64 (a full copy).
    """
    if np.issubdtype(dtype, np.integer):
        return np.ceil(values).astype(dtype)
    out = values.astype(dtype)
    low = out < values
    out[low] = np.nextafter(out[low], np.array(np.inf, dtype=dtype))
    return out


def _aupro_binned(s: _PixelScores, fpr_limit: float, thresholds: np.ndarray) -> float:
    """AUPRO with the curve evaluated only at `thresholds` (ascending, float64)."""
    neg, pos, w, n_regions = s
    thresholds = _ceil_to_dtype(thresholds, neg.dtype)
    cum_w = np.concatenate(([0.0], np.cumsum(w)))  # weight of the first k defect pixels
    n_ge = neg.size - np.searchsorted(neg, thresholds, side="left")  # (T,) normal >= thr
    w_ge = cum_w[-1] - cum_w[np.searchsorted(pos, thresholds, side="left")]  # (T,)
    # highest threshold first; the curve starts at (0, 0) and ends at (1, 1) like the official one
    fpr = np.concatenate(([0.0], n_ge[::-1] / neg.size, [1.0]))
    pro = np.concatenate(([0.0], np.minimum(w_ge[::-1] / n_regions, 1.0), [1.0]))
    return min(_trapezoid(fpr, pro, fpr_limit) / fpr_limit, 1.0)


def _check_fpr_limit(fpr_limit: Any) -> None:
    if not isinstance(fpr_limit, (int, float, np.integer, np.floating)) or not 0 < fpr_limit <= 1:
        raise MetricError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")


def _check_threshold(threshold: Any) -> None:
    if not isinstance(threshold, (int, float, np.integer, np.floating)) or math.isnan(threshold):
        raise MetricError(f"threshold must be a number (not NaN), got {threshold!r}")


def _pro_ready(s: _PixelScores) -> None:
    if s.n_regions == 0:
        raise MetricError("AUPRO needs at least one defect region; every mask is empty")
    if s.neg.size == 0:
        raise MetricError("AUPRO needs normal pixels; every mask covers its whole image")


# --------------------------------------------------------------------------- image-level


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve; ties count half (identical to sklearn's roc_auc_score)."""
    y, s = _labels_scores(labels, scores)
    _both_classes(int(y.sum()), int((~y).sum()), "AUROC")
    return _auc_sorted(np.sort(s[y]), np.sort(s[~y]))


def roc_curve(labels: Any, scores: Any, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve as (fpr, tpr, thresholds), each (K,), thresholds descending.

    Same points as sklearn.metrics.roc_curve: the first point is (0, 0) at threshold +inf, a
    point is predicted anomalous when score >= threshold, and `drop_intermediate` removes
    collinear points (the curve and its area are unchanged).
    """
    y, s = _labels_scores(labels, scores)
    _both_classes(int(y.sum()), int((~y).sum()), "ROC curve")
    order = np.argsort(s, kind="stable")[::-1]
    s_desc, y_desc = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_desc)), s_desc.size - 1]  # end of each tie group
    tps = np.cumsum(y_desc, dtype=np.int64)[last]
    fps = last + 1 - tps
    thr = s_desc[last].astype(np.float64)
    if drop_intermediate and tps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        tps, fps, thr = tps[keep], fps[keep], thr[keep]
    tps, fps, thr = np.r_[0, tps], np.r_[0, fps], np.r_[np.inf, thr]
    return fps / fps[-1], tps / tps[-1], thr


def f1_at_threshold(labels: Any, scores: Any, threshold: float) -> dict[str, float | int]:
    """Precision, recall, F1 and the confusion counts when `score >= threshold` is anomalous.

    Undefined ratios (no predicted or no actual anomalies) are reported as 0.0.
    """
    y, s = _labels_scores(labels, scores)
    _check_threshold(threshold)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    tn = int(y.size - tp - fp - fn)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def best_f1(labels: Any, scores: Any) -> dict[str, float | int | bool]:
    """ORACLE: the best F1 over all thresholds, chosen WITH the test labels.

    For reference only (how separable the scores are); never use its threshold for deployment
    or report it as the model's F1 -- thresholds are calibrated on held-out good images.
    Returns `f1_at_threshold`'s dict plus `threshold` and `selected_on_test_labels=True`.
    Among equal F1 values the highest threshold wins.
    """
    y, s = _labels_scores(labels, scores)
    n_pos = int(y.sum())
    _both_classes(n_pos, int((~y).sum()), "best F1")
    order = np.argsort(s, kind="stable")[::-1]
    s_desc = s[order]
    last = np.r_[np.flatnonzero(np.diff(s_desc)), s_desc.size - 1]
    tps = np.cumsum(y[order], dtype=np.int64)[last]
    fps = last + 1 - tps
    f1 = 2 * tps / (tps + fps + n_pos)  # 2TP / (2TP + FP + FN) with FN = P - TP
    thr = s_desc[last][int(np.argmax(f1))].item()
    out: dict[str, float | int | bool] = dict(f1_at_threshold(y, s, thr))
    out.update(threshold=thr, selected_on_test_labels=True)
    return out


# --------------------------------------------------------------------------- pixel-level


def pixel_auroc(masks: Sequence[Any], maps: Sequence[Any]) -> float:
    """AUROC over all pixels of all images; each mask (H, W) matches its map, sizes may differ."""
    s = _collect(_pairs(masks, maps), regions=False)
    _both_classes(s.pos.size, s.neg.size, "pixel AUROC")
    return _auc_sorted(s.pos, s.neg)


def aupro(
    masks: Sequence[Any],
    maps: Sequence[Any],
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit` (MVTec AD).

    Regions are 8-connected components of each mask (as the official code). PRO(t) is the mean
    over all regions of all images of the fraction of the region scoring >= t; FPR(t) is over all
    normal pixels of all images. The curve runs from (0, 0) to (1, 1), is integrated with the
    trapezoid rule up to exactly `fpr_limit` (interpolated) and divided by `fpr_limit`.

    num_thresholds: None = exact (every distinct score is a threshold). An int T evaluates the
    curve only at T thresholds equally spaced between the lowest and highest map score (binned
    PRO as in anomalib); cheaper to reason about, slightly different values.
    """
    _check_fpr_limit(fpr_limit)
    if num_thresholds is not None and (
        isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)) or num_thresholds < 2
    ):
        raise MetricError(f"num_thresholds must be None (exact) or an int >= 2, got {num_thresholds!r}")
    s = _collect(_pairs(masks, maps), regions=True)
    _pro_ready(s)
    if num_thresholds is None:
        return _aupro_exact(s, float(fpr_limit))
    lo = float(min(s.neg[0], s.pos[0]))
    hi = float(max(s.neg[-1], s.pos[-1]))
    return _aupro_binned(s, float(fpr_limit), np.linspace(lo, hi, num_thresholds))


def _pixel_metrics(pairs: list[tuple[np.ndarray, np.ndarray]], fpr_limit: float) -> tuple[float | None, float | None]:
    """(pixel AUROC, AUPRO) from one sort of the normal pixels; None where undefined."""
    if not pairs:
        return None, None
    s = _collect(pairs, regions=True)
    if s.pos.size == 0 or s.neg.size == 0:
        return None, None
    return _auc_sorted(s.pos, s.neg), _aupro_exact(s, fpr_limit)


def _pixel_auroc_split(
    good_neg: np.ndarray, defect_pairs: list[tuple[np.ndarray, np.ndarray]]
) -> dict[str, float | None]:
    """Where the pooled pixel AUROC is won or lost: the defect pixels ranked against the normal pixels of
    the defective images only (localisation within an image) and against those of the good images only
    (`good_neg`, sorted; a map that runs hotter on defective parts as a whole). None where undefined."""
    out: dict[str, float | None] = {"pixel_auroc_within_defective": None, "pixel_auroc_vs_good": None}
    if not defect_pairs:
        return out
    d = _collect(defect_pairs, regions=False)
    if d.pos.size and d.neg.size:
        out["pixel_auroc_within_defective"] = _auc_sorted(d.pos, d.neg)
    if d.pos.size and good_neg.size:
        out["pixel_auroc_vs_good"] = _auc_sorted(d.pos, good_neg)
    return out


# --------------------------------------------------------------------------- evaluation report


@dataclass(frozen=True, eq=False)
class EvalRecord:
    """One test image: label 1 = anomalous; map and mask are (H, W) and optional."""

    label: int
    defect_type: str
    score: float
    anomaly_map: np.ndarray | None = None
    mask: np.ndarray | None = None


def evaluate(records: Sequence[EvalRecord], threshold: float, fpr_limit: float = 0.3) -> dict[str, Any]:
    """Metrics for a labelled test set at the calibrated `threshold` (JSON-friendly dict).

    Keys: image_auroc, pixel_auroc, aupro, threshold, precision, recall, f1, tp, fp, fn, tn,
    n_images, n_good, n_anomalous, pixel_images, pixel_excluded, pixel_missing_mask,
    pixel_auroc_within_defective, pixel_auroc_vs_good, per_defect.
    Pixel metrics use the records that have a map: good images (a missing mask means all
    normal) and anomalous images whose mask has defect pixels. Anomalous images with an empty
    mask (labelling noise) are left out and counted in `pixel_excluded`; those with no mask at
    all in `pixel_missing_mask`. pixel_auroc / aupro are None when no usable pair exists.
    pixel_auroc_within_defective / pixel_auroc_vs_good split the pooled pixel AUROC: the same defect
    pixels ranked against the normal pixels of the defective images only, or of the good images only.
    per_defect[type] compares that type's images with all good images: count, image_auroc,
    pixel_auroc, aupro, pixel_excluded, and the same split of the pixel AUROC.
    """
    if len(records) == 0:
        raise MetricError("evaluate needs at least one record")
    _check_threshold(threshold)
    _check_fpr_limit(fpr_limit)
    labels = _labels_1d([r.label for r in records])
    scores = _real_array([r.score for r in records], "record scores")
    if scores.ndim != 1:
        raise MetricError(f"each record's score must be one number, got shape {scores.shape}")
    good = [i for i in range(len(records)) if not labels[i]]
    _both_classes(len(records) - len(good), len(good), "evaluation")

    usable: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # record index -> (mask, map)
    excluded: set[int] = set()
    missing: set[int] = set()
    for i, r in enumerate(records):
        if r.anomaly_map is None:
            continue
        if r.mask is None:
            if labels[i]:
                missing.add(i)
                continue
            amap = np.asarray(r.anomaly_map)
            usable[i] = _image_pair(np.zeros(amap.shape, dtype=bool), amap, i)
            continue
        g, m = _image_pair(r.mask, r.anomaly_map, i)
        if labels[i] and not g.any():
            excluded.add(i)
        elif not labels[i] and g.any():
            raise MetricError(
                f"record #{i} is labelled good (0) but its mask has {int(g.sum())} defect pixels; "
                "fix the label or the mask"
            )
        else:
            usable[i] = (g, m)

    pix_auroc, pix_aupro = _pixel_metrics(list(usable.values()), fpr_limit)
    out: dict[str, Any] = {
        "image_auroc": auroc(labels, scores),
        "pixel_auroc": pix_auroc,
        "aupro": pix_aupro,
        "threshold": float(threshold),
        **f1_at_threshold(labels, scores, threshold),
        "n_images": len(records),
        "n_good": len(good),
        "n_anomalous": len(records) - len(good),
        "pixel_images": len(usable),
        "pixel_excluded": len(excluded),
        "pixel_missing_mask": len(missing),
    }

    good_pairs = [usable[i] for i in good if i in usable]
    good_neg = _collect(good_pairs, regions=False).neg if good_pairs else np.empty(0)
    out.update(_pixel_auroc_split(good_neg, [usable[i] for i in usable if labels[i]]))
    per_defect: dict[str, dict[str, Any]] = {}
    for kind in sorted({records[i].defect_type for i in range(len(records)) if labels[i]}):
        idx = [i for i in range(len(records)) if labels[i] and records[i].defect_type == kind]
        sub = good + idx
        type_pairs = [usable[i] for i in idx if i in usable]
        p_auc, p_pro = (None, None)
        if type_pairs:
            p_auc, p_pro = _pixel_metrics(good_pairs + type_pairs, fpr_limit)
        per_defect[kind] = {
            "count": len(idx),
            "image_auroc": auroc(labels[sub], scores[sub]),
            "pixel_auroc": p_auc,
            "aupro": p_pro,
            "pixel_excluded": sum(i in excluded for i in idx),
            **_pixel_auroc_split(good_neg, type_pairs),
        }
    out["per_defect"] = per_defect
    return out
