"""One bench configuration, in its own process: `python -m patchaudit.bench.worker <config dir>`.

Reads `<config dir>/spec.json` (written by patchaudit.bench.runner), fits with the honest protocol
(workers.fit.fit_model: threshold by k-fold cross-fitting), saves the model, loads it back as a deployment
would, scores the test split end to end (decode included) and computes the metrics. Writes
`scores.parquet`, a few heatmap overlays under `heatmaps/`, and last `worker_result.json`.
Peak memory is this process's ru_maxrss, so it is this configuration's own.
"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, cast

ROC_MAX_POINTS = 200
HEATMAP_SIDE = 224  # px, longest side of an embedded overlay


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def downsample_curve(
    x: list[float], y: list[float], max_points: int = ROC_MAX_POINTS
) -> tuple[list[float], list[float]]:
    """Keep at most `max_points` points, always the first and the last (the curve's ends)."""
    n = len(x)
    if n <= max_points:
        return list(x), list(y)
    step = (n - 1) / (max_points - 1)
    idx = sorted({round(i * step) for i in range(max_points)})
    return [x[i] for i in idx], [y[i] for i in idx]


def pick_examples(labels: list[int], scores: list[float], n: int) -> dict[str, list[int]]:
    """Indices of the top-scoring test images, the highest-scoring good images (worst false
    positives) and the lowest-scoring defective images (missed defects), `n` each."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    return {
        "top": order[:n],
        "false_positive": [i for i in order if labels[i] == 0][:n],
        "missed": [i for i in reversed(order) if labels[i] == 1][:n],
    }


def overlay_png(image: Any, amap: Any, mask: Any, vmin: float, vmax: float, side: int = HEATMAP_SIDE) -> bytes:
    """Heatmap blended over the image (or the image alone without a map), ground-truth outline in white."""
    import numpy as np
    from PIL import Image
    from scipy import ndimage

    from patchaudit.workers.maps import heatmap_png

    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL (width, height)
    if amap is not None:
        img = Image.open(io.BytesIO(heatmap_png(amap, vmin, vmax, image, alpha=0.5, max_side=side))).convert("RGB")
    else:
        img = Image.fromarray(image).convert("RGB").resize(size, Image.Resampling.BILINEAR)
    if mask is not None and mask.any():
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(img.size, Image.Resampling.NEAREST)) > 0
        edge = small & ~ndimage.binary_erosion(small)
        arr = np.asarray(img).copy()
        arr[edge] = (255, 255, 255)
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def run(config_dir: Path) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from patchaudit.bench.selection import REPORT, SELECTION, part_metrics, split_parts
    from patchaudit.evaluation import metrics
    from patchaudit.store.objects import open_store
    from patchaudit.workers.config import model_config_from_dict
    from patchaudit.workers.datasets import discover, require_test, require_train
    from patchaudit.workers.fit import fit_model
    from patchaudit.workers.model import load_model
    from patchaudit.workers.pipeline import score_keys

    spec = json.loads((config_dir / "spec.json").read_text())
    config = model_config_from_dict(spec["model"])
    threads = int(spec["decode_threads"])
    load_start = os.getloadavg()[0]
    store = open_store(spec["data"])
    ds = discover(store)
    train, items = require_train(ds), require_test(ds)

    # -- fit (features, cross-fitted calibration, coreset/statistics) ---------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    model, info = fit_model(config, store, train, None, threads=threads)
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak_fit = peak_rss_mb()
    model_dir = config_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    manifest = model.save(str(model_dir))
    model_bytes = dir_bytes(model_dir)
    del model

    # -- score the test split with the model as saved (decode included in the timing) ------------------
    model = load_model(str(model_dir))
    keys = [t.key for t in items]
    t0, c0 = time.perf_counter(), time.process_time()
    results = list(score_keys(model, store.read_bytes, keys, threads=threads, keep_maps=model.has_maps))
    score_s, score_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    errors = [{"key": r.key, "error": r.error} for r in results if r.error is not None]
    scored = [r for r in results if r.error is None]
    stage_ms = {
        f"{k}_ms": float(np.mean([getattr(r, f"{k}_ms") for r in scored])) if scored else None
        for k in ("decode", "feature", "knn")
    }  # per image; decode overlaps the backbone

    # -- metrics: the labels and masks are read only now, and only for this -------------------------
    def read_mask(item, shape):
        if item.mask_key is None:
            return np.zeros(shape, dtype=bool) if item.label == 0 else None
        mask = np.asarray(Image.open(store.open_read(item.mask_key)).convert("L")) > 0
        if mask.shape != shape:  # masks are defined on the stored image's pixels
            raise ValueError(f"mask {item.mask_key} is {mask.shape}, image map is {shape}")
        return mask

    ok = [(t, r) for t, r in zip(items, results) if r.error is None]
    records = [
        metrics.EvalRecord(
            t.label,
            t.defect_type,
            cast(float, r.score),
            r.amap,
            read_mask(t, r.amap.shape) if r.amap is not None else None,
        )
        for t, r in ok
    ]
    ev = metrics.evaluate(records, model.threshold)
    # Nested selection: the same seeded, stratified cut for every configuration (all test items, so a
    # decode error of one configuration cannot move an image to the other part).
    part_of = dict(
        zip(
            keys,
            split_parts(
                keys,
                [t.defect_type for t in items],
                float(spec.get("selection_fraction", 0.0)),
                int(spec.get("split_seed", 0)),
            ),
        )
    )
    parts: dict[str, Any] = {}
    for name in (SELECTION, REPORT):
        idx = [i for i, (t, _) in enumerate(ok) if part_of[t.key] == name]
        try:
            parts[name] = part_metrics(metrics.evaluate([records[i] for i in idx], model.threshold))
        except metrics.MetricError as exc:  # e.g. no nested split asked for: the selection part is empty
            parts[name] = {"n_images": len(idx), "error": str(exc)}
    labels = [t.label for t, _ in ok]
    scores = [float(cast(float, r.score)) for _, r in ok]  # ok: no error, so a score
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    roc_x, roc_y = downsample_curve([float(v) for v in fpr], [float(v) for v in tpr])

    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "key": t.key,
                    "defect_type": t.defect_type,
                    "label": t.label,
                    "score": r.score,
                    "is_anomalous": r.is_anomalous,
                    "part": part_of[t.key],
                }
                for t, r in ok
            ]
        ),
        config_dir / "scores.parquet",
    )

    # -- heatmap overlays of a few telling images ----------------------------------------------------
    hm_dir = config_dir / "heatmaps"
    shutil.rmtree(hm_dir, ignore_errors=True)
    hm_dir.mkdir()
    vmin, vmax = model.heat_scale()
    heatmaps = []
    for kind, idx in pick_examples(labels, scores, int(spec["heatmaps"])).items():
        for j, i in enumerate(idx):
            t, r = ok[i]
            image = np.asarray(Image.open(store.open_read(t.key)).convert("RGB"))
            name = f"{kind}_{j}.png"
            mask = records[i].mask if r.amap is not None else read_mask(t, image.shape[:2])
            (hm_dir / name).write_bytes(overlay_png(image, r.amap, mask, vmin, vmax))
            heatmaps.append(
                {
                    "kind": kind,
                    "file": f"heatmaps/{name}",
                    "key": t.key,
                    "label": t.label,
                    "defect_type": t.defect_type,
                    "score": float(cast(float, r.score)),
                    "is_anomalous": bool(r.is_anomalous),
                }
            )
    if not spec.get("keep_model"):
        shutil.rmtree(model_dir, ignore_errors=True)

    n = len(items)
    return {
        **{
            k: ev[k]
            for k in (
                "image_auroc",
                "pixel_auroc",
                "aupro",
                "threshold",
                "precision",
                "recall",
                "f1",
                "tp",
                "fp",
                "fn",
                "tn",
                "n_good",
                "n_anomalous",
                "pixel_images",
                "pixel_excluded",
                "pixel_missing_mask",
                "per_defect",
            )
        },
        "n_test": n,
        "parts": parts,
        "selection_fraction": float(spec.get("selection_fraction", 0.0)),
        "split_seed": int(spec.get("split_seed", 0)),
        "n_fit_images": info["n_fit_images"],
        "n_calibration_images": info["n_calibration_images"],
        "calibration": model.calibration,
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu_s,
        "fit_stages_s": {k: v for k, v in info.items() if isinstance(v, float)},
        "score_s": score_s,
        "score_cpu_s": score_cpu_s,
        "images_per_s": n / score_s,
        "images_per_cpu_s": n / score_cpu_s,
        "score_stages_ms": stage_ms,
        "bank_size": manifest.get("bank_size"),
        "model_bytes": model_bytes,
        "model_mb": model_bytes / 1e6,
        "peak_fit_rss_mb": peak_fit,
        "peak_rss_mb": peak_rss_mb(),
        "decode_errors": errors + info["errors"],
        "roc": {"fpr": roc_x, "tpr": roc_y},
        "heatmaps": heatmaps,
        "heat_scale": [vmin, vmax],
        "model_id": model.model_id,
        "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m patchaudit.bench.worker <config dir holding spec.json>", file=sys.stderr)
        return 2
    config_dir = Path(argv[0])
    result = run(config_dir)
    tmp = config_dir / "worker_result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, allow_nan=False))
    os.replace(tmp, config_dir / "worker_result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
