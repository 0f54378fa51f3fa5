"""Tests for patchaudit.evaluation.metrics against brute-force references written from the definitions."""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest

from patchaudit.errors import PatchauditError
from patchaudit.evaluation.metrics import (
    EvalRecord,
    MetricError,
    aupro,
    auroc,
    best_f1,
    evaluate,
    f1_at_threshold,
    pixel_auroc,
    roc_curve,
)

# --------------------------------------------------------------------------- references


def ref_auroc(labels, scores) -> float:
    """All (anomalous, good) pairs: 1 if ranked right, 1/2 if tied."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    p, n = s[y][:, None], s[~y][None, :]
    return float(((p > n) + 0.5 * (p == n)).mean())


def ref_regions(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components by breadth-first flood fill, one bool (H, W) array per region."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for r0 in range(h):
        for c0 in range(w):
            if not mask[r0, c0] or seen[r0, c0]:
                continue
            region = np.zeros_like(mask, dtype=bool)
            queue = deque([(r0, c0)])
            seen[r0, c0] = True
            while queue:
                r, c = queue.popleft()
                region[r, c] = True
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            queue.append((rr, cc))
            out.append(region)
    return out


def ref_aupro(masks, maps, thresholds, fpr_limit=0.3) -> float:
    """Slow AUPRO: PRO and FPR recomputed from full maps at every threshold."""
    masks = [np.asarray(m) != 0 for m in masks]
    maps = [np.asarray(a, dtype=np.float64) for a in maps]
    regions = [(i, reg) for i, m in enumerate(masks) for reg in ref_regions(m)]
    n_normal = sum(int((~m).sum()) for m in masks)
    points = [(0.0, 0.0)]
    for t in sorted(set(np.asarray(thresholds, dtype=np.float64).tolist()), reverse=True):
        pred = [a >= t for a in maps]
        pro = np.mean([pred[i][reg].mean() for i, reg in regions])
        fp = sum(int((p & ~m).sum()) for p, m in zip(pred, masks))
        points.append((fp / n_normal, float(pro)))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            if x0 < fpr_limit:
                y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
                area += 0.5 * (y0 + y_at) * (fpr_limit - x0)
            break
    return area / fpr_limit


def all_scores(maps) -> np.ndarray:
    return np.unique(np.concatenate([np.ravel(a) for a in maps]))


def synthetic(seed: int, n_images: int = 4, shape=(20, 24), levels: int | None = None):
    """Masks with several regions per image (incl. diagonal contacts) and noisy maps."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(n_images):
        m = np.zeros(shape, dtype=np.uint8)
        if i % 4 != 3:  # every 4th image is defect-free
            for _ in range(rng.integers(2, 5)):
                r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
                m[r : r + rng.integers(1, 5), c : c + rng.integers(1, 5)] = 255
            r, c = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
            m[r, c] = m[r + 1, c + 1] = 255  # touches only diagonally
        a = rng.random(shape) + 0.8 * (m > 0) * rng.random(shape)
        if levels is not None:
            a = np.round(a * levels) / levels  # heavy ties
        masks.append(m)
        maps.append(a)
    return masks, maps


# --------------------------------------------------------------------------- AUROC / ROC


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    y[:2] = [0, 1]
    s = rng.integers(0, 12, 300) + y * rng.integers(0, 4, 300)  # many ties, some signal
    assert auroc(y, s) == pytest.approx(ref_auroc(y, s), abs=1e-12)
    f = rng.normal(size=300) + y
    assert auroc(y, f) == pytest.approx(ref_auroc(y, f), abs=1e-12)


def test_auroc_known_values():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc([0, 1, 0, 1], [5, 5, 5, 5]) == 0.5
    # sklearn docs example: roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auroc(np.array([False, True]), np.array([1, 2], dtype=np.int32)) == 1.0


def test_auroc_one_class_raises_metric_error():
    with pytest.raises(MetricError, match="both classes") as exc:
        auroc([1, 1, 1], [0.1, 0.2, 0.3])
    assert isinstance(exc.value, PatchauditError) and isinstance(exc.value, ValueError)
    with pytest.raises(MetricError, match="both classes"):
        auroc([0, 0], [0.1, 0.2])


@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "0 \\(good\\) or 1"),
        ([0, 1], [0.1, 0.2, 0.3], "must match"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 1], ["a", "b"], "real numeric"),
    ],
)
def test_auroc_rejects_bad_input(labels, scores, match):
    with pytest.raises(MetricError, match=match):
        auroc(labels, scores)


def test_roc_curve_known_points_and_area():
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = rng.integers(0, 30, 500) + 3 * y
    for drop in (True, False):
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=drop)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
        assert np.all(np.diff(thr) < 0) and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        area = float(np.sum(0.5 * (tpr[1:] + tpr[:-1]) * np.diff(fpr)))
        assert area == pytest.approx(auroc(y, s), abs=1e-12)
    assert len(roc_curve(y, s)[0]) < len(roc_curve(y, s, drop_intermediate=False)[0])


def test_pixel_auroc_over_images_of_different_sizes():
    rng = np.random.default_rng(0)
    shapes = [(5, 7), (9, 4), (6, 6)]
    masks = [rng.random(sh) < 0.2 for sh in shapes]
    maps = [rng.integers(0, 10, sh) + 2 * m for sh, m in zip(shapes, masks)]
    flat_y = np.concatenate([m.ravel() for m in masks])
    flat_s = np.concatenate([a.ravel() for a in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(ref_auroc(flat_y, flat_s), abs=1e-12)


def test_pixel_auroc_rejects_mismatch_and_one_class():
    with pytest.raises(MetricError, match="shape"):
        pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(MetricError, match="2 masks but 1"):
        pixel_auroc([np.zeros((4, 4))] * 2, [np.zeros((4, 4))])
    with pytest.raises(MetricError, match="both classes"):
        pixel_auroc([np.zeros((4, 4))], [np.ones((4, 4))])
    with pytest.raises(MetricError, match="2-D"):
        pixel_auroc([np.zeros((1, 4, 4))], [np.zeros((1, 4, 4))])


# --------------------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("seed", range(4))
def test_aupro_exact_matches_reference_at_every_score(seed):
    masks, maps = synthetic(seed)
    ref = ref_aupro(masks, maps, all_scores(maps))
    assert 0.05 < ref < 0.95  # a non-trivial case
    assert aupro(masks, maps) == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_aupro_with_heavy_ties_matches_reference(seed):
    masks, maps = synthetic(seed, levels=6)
    for limit in (0.3, 0.05, 1.0):
        ref = ref_aupro(masks, maps, all_scores(maps), fpr_limit=limit)
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(ref, abs=1e-9)


def test_aupro_agrees_with_dense_threshold_reference():
    masks, maps = synthetic(7, n_images=5)
    lo, hi = all_scores(maps)[[0, -1]]
    ref = ref_aupro(masks, maps, np.linspace(lo, hi, 3000))
    assert aupro(masks, maps) == pytest.approx(ref, abs=1e-3)


def test_aupro_binned_matches_reference_at_the_same_thresholds():
    masks, maps = synthetic(11, n_images=4)
    lo, hi = all_scores(maps)[[0, -1]]
    for t in (2, 7, 50):
        ref = ref_aupro(masks, maps, np.linspace(lo, hi, t))
        assert aupro(masks, maps, num_thresholds=t) == pytest.approx(ref, abs=1e-12)
    assert aupro(masks, maps, num_thresholds=20000) == pytest.approx(aupro(masks, maps), abs=2e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int16])
def test_aupro_binned_keeps_score_dtype_semantics(dtype):
    # thresholds are float64; a float32 / int map must compare as if upcast, without a copy
    masks, maps = synthetic(12, n_images=3)
    small = [(a * 1000).astype(dtype) for a in maps]
    lo, hi = all_scores(small)[[0, -1]].astype(np.float64)
    for t in (3, 13, 101):
        ref = ref_aupro(masks, small, np.linspace(lo, hi, t))
        assert aupro(masks, small, num_thresholds=t) == pytest.approx(ref, abs=1e-12)
    exact_ref = ref_aupro(masks, small, all_scores(small))
    assert aupro(masks, small) == pytest.approx(exact_ref, abs=1e-9)


def test_aupro_is_one_for_a_perfect_map():
    masks, maps = synthetic(1, n_images=4)
    rng = np.random.default_rng(0)
    perfect = [np.where(m > 0, 2.0 + rng.random(m.shape), rng.random(m.shape)) for m in masks]
    assert aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(masks, perfect) == 1.0


def test_aupro_known_values():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    # all scores tied: one segment (0,0)->(1,1), cut at 0.3: 0.5 * 0.3 * 0.3 / 0.3
    assert aupro([mask], [np.ones((4, 4))]) == pytest.approx(0.15, abs=1e-12)
    # defects score below every normal pixel: PRO stays 0 up to FPR 1
    assert aupro([mask], [np.where(mask, 0.0, 1.0)]) == 0.0
    # the curve passes exactly through FPR = 0.3 (3 of 10 normal pixels); area 0.1 / 0.3
    m = np.zeros((1, 12), dtype=bool)
    m[0, :2] = True  # one region of two pixels, scores 0.9 and 0.5
    a = np.array([[0.9, 0.5, 1.0, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01]])
    assert aupro([m], [a]) == pytest.approx(1 / 3, abs=1e-12)
    assert ref_aupro([m], [a], all_scores([a])) == pytest.approx(1 / 3, abs=1e-12)


def test_aupro_regions_are_8_connected_like_the_official_code():
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[0, 1] = mask[1, 0] = True  # an L of 3 pixels
    b = (2, 1)  # touches (1, 0) only diagonally
    mask[b] = True
    amap = np.full((5, 5), 0.5)
    amap[~mask] = np.linspace(0.1, 0.9, int((~mask).sum()))
    amap[mask] = 0.0
    amap[b] = 2.0  # only the diagonal pixel is detected before any false positive
    # 8-connected: one region of 4 pixels, PRO = 1/4 all the way; 4-connected would give 1/2
    assert aupro([mask], [amap]) == pytest.approx(0.25, abs=1e-12)


def test_aupro_rejects_undefined_and_bad_input():
    with pytest.raises(MetricError, match="defect region"):
        aupro([np.zeros((4, 4))], [np.ones((4, 4))])
    with pytest.raises(MetricError, match="normal pixels"):
        aupro([np.ones((4, 4))], [np.ones((4, 4))])
    with pytest.raises(MetricError, match="fpr_limit"):
        aupro([np.eye(4)], [np.ones((4, 4))], fpr_limit=0.0)
    with pytest.raises(MetricError, match="num_thresholds"):
        aupro([np.eye(4)], [np.ones((4, 4))], num_thresholds=1)
    with pytest.raises(MetricError, match="NaN"):
        aupro([np.eye(4)], [np.full((4, 4), np.nan)])
    with pytest.raises(MetricError, match="no images"):
        aupro([], [])


# --------------------------------------------------------------------------- F1


def test_f1_at_threshold_counts():
    y = [0, 0, 1, 1, 1, 0]
    s = [0.1, 0.5, 0.5, 0.9, 0.2, 0.7]
    out = f1_at_threshold(y, s, 0.5)  # score >= 0.5 is anomalous
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 2, 1, 1)
    assert out["precision"] == pytest.approx(0.5)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(4 / 7)
    none = f1_at_threshold(y, s, 10.0)
    assert (none["tp"], none["fp"], none["fn"], none["tn"]) == (0, 0, 3, 3)
    assert none["precision"] == none["recall"] == none["f1"] == 0.0
    with pytest.raises(MetricError, match="threshold"):
        f1_at_threshold(y, s, float("nan"))


def test_best_f1_is_the_brute_force_maximum_and_says_it_used_labels():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    y[:2] = [0, 1]
    s = rng.integers(0, 20, 200) + 4 * y
    best = best_f1(y, s)
    cands = {t: f1_at_threshold(y, s, t)["f1"] for t in np.unique(s)}
    top = max(cands.values())
    assert best["f1"] == pytest.approx(top)
    assert best["threshold"] == max(t for t, f in cands.items() if f == top)
    assert best["selected_on_test_labels"] is True
    # F1 = 2/3 at thresholds 4 and 1: the higher one is reported
    tied = best_f1([1, 0, 1, 0, 0, 1], [6, 5, 4, 3, 2, 1])
    assert tied["threshold"] == 4 and tied["f1"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- evaluate


def _records():
    rng = np.random.default_rng(0)
    recs, shape = [], (16, 16)
    for _ in range(4):
        recs.append(EvalRecord(0, "good", float(rng.random()), rng.random(shape), None))
    for kind, n in (("scratch", 3), ("dent", 2)):
        for _ in range(n):
            m = np.zeros(shape, dtype=np.uint8)
            r, c = rng.integers(0, 12, 2)
            m[r : r + 3, c : c + 4] = 1
            amap = rng.random(shape) + 0.7 * m * rng.random(shape)
            recs.append(EvalRecord(1, kind, float(rng.random() + 0.3), amap, m))
    recs.append(EvalRecord(1, "dent", 0.9, rng.random(shape), np.zeros(shape)))  # noisy label
    recs.append(EvalRecord(1, "crack", 0.2, rng.random(shape), None))  # no mask at all
    return recs


def test_evaluate_matches_direct_metric_calls():
    recs = _records()
    out = evaluate(recs, threshold=0.5)
    y = [r.label for r in recs]
    s = [r.score for r in recs]
    assert out["image_auroc"] == pytest.approx(auroc(y, s))
    f1 = f1_at_threshold(y, s, 0.5)
    assert {k: out[k] for k in f1} == f1
    assert (out["n_images"], out["n_good"], out["n_anomalous"]) == (11, 4, 7)
    assert (out["pixel_images"], out["pixel_excluded"], out["pixel_missing_mask"]) == (9, 1, 1)

    def pix(keep):
        ms = [r.mask if r.mask is not None else np.zeros((16, 16)) for r in keep]
        return [r.anomaly_map for r in keep], ms

    good = [r for r in recs if r.label == 0]
    usable = good + [r for r in recs if r.label == 1 and r.mask is not None and r.mask.any()]
    maps, masks = pix(usable)
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert out["aupro"] == pytest.approx(ref_aupro(masks, maps, all_scores(maps)), abs=1e-9)

    # the split: the same defect pixels against the defective images' own normal pixels, or the good images'
    defective = usable[len(good) :]
    maps, masks = pix(defective)
    assert out["pixel_auroc_within_defective"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    pos = np.concatenate([r.anomaly_map[r.mask != 0] for r in defective])
    neg = np.concatenate([r.anomaly_map.ravel() for r in good])
    ref = auroc(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg])
    assert out["pixel_auroc_vs_good"] == pytest.approx(ref, abs=1e-12)

    assert sorted(out["per_defect"]) == ["crack", "dent", "scratch"]
    dent = out["per_defect"]["dent"]
    assert (dent["count"], dent["pixel_excluded"]) == (3, 1)
    sub = good + [r for r in recs if r.defect_type == "dent"]
    ref = ref_auroc([r.label for r in sub], [r.score for r in sub])
    assert dent["image_auroc"] == pytest.approx(ref, abs=1e-12)
    maps, masks = pix(good + [r for r in recs if r.defect_type == "dent" and r.mask.any()])
    assert dent["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert dent["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    dent_defective = [r for r in recs if r.defect_type == "dent" and r.mask.any()]
    maps, masks = pix(dent_defective)
    assert dent["pixel_auroc_within_defective"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    crack = out["per_defect"]["crack"]
    assert crack["count"] == 1 and crack["pixel_auroc"] is None and crack["aupro"] is None
    assert crack["pixel_auroc_within_defective"] is None and crack["pixel_auroc_vs_good"] is None
    json.dumps(out)  # report-ready: plain Python types only


def test_evaluate_without_maps_and_with_bad_records():
    recs = [EvalRecord(0, "good", 0.1), EvalRecord(1, "hole", 0.8), EvalRecord(1, "hole", 0.05)]
    out = evaluate(recs, threshold=0.5)
    assert out["pixel_auroc"] is None and out["aupro"] is None
    assert out["pixel_auroc_within_defective"] is None and out["pixel_auroc_vs_good"] is None
    assert out["image_auroc"] == 0.5 and out["per_defect"]["hole"]["count"] == 2
    with pytest.raises(MetricError, match="both classes"):
        evaluate([EvalRecord(0, "good", 0.1)], threshold=0.5)
    bad = recs + [EvalRecord(0, "good", 0.2, np.zeros((4, 4)), np.eye(4))]
    with pytest.raises(MetricError, match="labelled good"):
        evaluate(bad, threshold=0.5)
    with pytest.raises(MetricError, match="threshold"):
        evaluate(recs, threshold="high")
    with pytest.raises(MetricError, match="fpr_limit"):
        evaluate(recs, threshold=0.5, fpr_limit=1.5)
