"""Input geometry on non-square images: squashed vs aspect-kept vs tiled, one table.

Two data sets whose images are not square:
- magnetic tile (its images vary in size and shape, about 100-630 x 220-400 px);
- bottle made non-square: 900x450 (width x height) halves of the 900x900 MVTec images, made here under
  --work. Each defective test image gives the half holding more of its defect mask (with that half of
  the mask); good test and train images a seeded half. The set is written once and reused.

For each data set and geometry, PatchCore (lite0, layers 2+3) is fitted on a seeded subset of the
train images (--train, default 40) with a small coreset (--coreset, default 0.05) to keep it
affordable on 2 cores, with `patchaudit fit`'s calibration (cross-fitting, 2 folds: the threshold is
not what this table measures), then the
whole test split is scored through `patchaudit.workers.pipeline.score_keys` (decode included) and
evaluated with `patchaudit.evaluation.metrics.evaluate`. images/s is the test scoring throughput.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/geometry.py --out runs/bench/geometry.json \
        --tile-scale bottle900x450=0.5 --test magnetic_tile=128

Geometries (workers/geometry.py): squash = resize to 256x256; aspect = short side 256, long side
rounded to the stride (bottle 512x256; magnetic tile varies); tile = 256-px tiles, overlap 0.25, at
--tile-scale (default 1, the original resolution: bottle 896x448, 5x2 = 10 tiles; at 0.5, 450x225 is
enlarged to a 512x256 canvas, 3 tiles; an image whose short side is under 256 px is enlarged to 256).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GEOMETRIES = ("squash", "aspect", "tile")


def make_wide_bottle(src: Path, dst: Path, seed: int = 0) -> Path:
    """900x450 (w x h) halves of MVTec bottle, masks cut alike; returns `dst` (made once, then reused)."""
    done = dst / ".complete"
    if done.is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for path in sorted(src.rglob("*.png")):
        rel = path.relative_to(src)
        if rel.parts[0] not in ("train", "test"):
            continue
        img = np.asarray(Image.open(path).convert("RGB"))
        h = img.shape[0] // 2
        mask = None
        if rel.parts[0] == "test" and rel.parts[1] != "good":
            mpath = src / "ground_truth" / rel.parts[1] / f"{path.stem}_mask.png"
            mask = np.asarray(Image.open(mpath).convert("L"))
            half = 0 if (mask[:h] > 0).sum() >= (mask[h:] > 0).sum() else 1
        else:
            half = int(rng.integers(2))
        sl = slice(0, h) if half == 0 else slice(h, 2 * h)
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[sl]).save(out)
        if mask is not None:
            mout = dst / "ground_truth" / rel.parts[1] / f"{path.stem}_mask.png"
            mout.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask[sl]).save(mout)
    done.write_text("ok\n")
    return dst


def test_subset(items: list[Any], n: int | None, seed: int = 0) -> list[Any]:
    """A seeded subset of `n` test items, stratified by defect type (each type keeps its share, >= 1)."""
    if n is None or n >= len(items):
        return list(items)
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[Any]] = {}
    for t in items:
        by_type.setdefault(t.defect_type, []).append(t)
    out = []
    for name in sorted(by_type):
        group = by_type[name]
        k = max(1, round(n * len(group) / len(items)))
        out.extend(group[i] for i in sorted(rng.choice(len(group), size=min(k, len(group)), replace=False)))
    return sorted(out, key=lambda t: t.key)


def run_one(
    data: Path,
    geometry: str,
    n_train: int,
    coreset: float,
    tile_scale: float,
    threads: int,
    seed: int = 0,
    n_test: int | None = None,
) -> dict[str, Any]:
    import torch

    from patchaudit.evaluation.metrics import EvalRecord, evaluate
    from patchaudit.store.objects import open_store
    from patchaudit.workers.config import model_config_from_dict
    from patchaudit.workers.datasets import discover
    from patchaudit.workers.fit import fit_model
    from patchaudit.workers.pipeline import score_keys

    store = open_store(str(data))
    ds = discover(store)
    train = sorted(ds.train_keys)
    rng = np.random.default_rng(seed)
    train = sorted(train[i] for i in rng.choice(len(train), size=min(n_train, len(train)), replace=False))
    config = model_config_from_dict(
        {
            "geometry": geometry,
            "image_size": [256, 256],
            "tile_size": 256,
            "tile_overlap": 0.25,
            "tile_scale": tile_scale,
            "seed": seed,
            "patchcore": {"coreset_ratio": coreset},
            "calibration": {"folds": 2},  # the threshold is not measured here: the cheapest cross-fitting
        }
    )
    t0, c0 = time.perf_counter(), time.process_time()
    model, info = fit_model(config, store, train, threads=threads)
    fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    test = test_subset(ds.test, n_test, seed)
    keys = [t.key for t in test]
    t0, c0 = time.perf_counter(), time.process_time()
    results = list(score_keys(model, store.read_bytes, keys, threads=threads, keep_maps=True))
    score_s, score_cpu = time.perf_counter() - t0, time.process_time() - c0
    records = []
    for t, r in zip(test, results):
        if r.error is not None:
            raise RuntimeError(f"{t.key}: {r.error}")
        if t.mask_key is not None:
            mask = np.asarray(Image.open(store.open_read(t.mask_key)).convert("L")) > 0
        else:
            mask = np.zeros(r.amap.shape, bool) if t.label == 0 else None
        records.append(EvalRecord(t.label, t.defect_type, r.score, r.amap, mask))
    ev = evaluate(records, model.threshold)
    return {
        "data": data.name,
        "geometry": geometry,
        "image_auroc": ev["image_auroc"],
        "pixel_auroc": ev["pixel_auroc"],
        "aupro": ev["aupro"],
        "images_per_s": len(keys) / score_s,
        "images_per_cpu_s": len(keys) / score_cpu,
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu,
        "bank_size": model.bank_size,
        "patches": info.get("patches"),
        "n_fit": info["n_fit_images"],
        "n_cal": info["n_calibration_images"],
        "n_test": len(keys),
        "tile_scale": tile_scale,
        "coreset": coreset,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/geometry.json")
    p.add_argument("--work", default="runs/data", help="where the 900x450 bottle set is made")
    p.add_argument("--sets", default="bottle900x450,magnetic_tile")
    p.add_argument("--geometries", default=",".join(GEOMETRIES))
    p.add_argument("--train", type=int, default=40, help="train images per fit (seeded subset)")
    p.add_argument("--coreset", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tile-scale", default="", help="per set, tile_scale, e.g. bottle900x450=0.5 (default: 1)")
    p.add_argument(
        "--test",
        default="",
        help="per set, a seeded stratified subset of test images, e.g. magnetic_tile=128 (default: all)",
    )
    args = p.parse_args(argv)
    sets = {
        "bottle900x450": (
            lambda: make_wide_bottle(DATA / "mvtec_ad" / "bottle", Path(args.work) / "bottle900x450"),
            1.0,
        ),
        "magnetic_tile": (lambda: DATA / "magnetic_tile" / "magnetic_tile", 1.0),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.is_file() else []
    for name in args.sets.split(","):
        make, scale = sets[name]
        scales = dict(kv.split("=") for kv in args.tile_scale.split(",") if kv)
        scale = float(scales.get(name, scale))
        data = make()
        for geometry in args.geometries.split(","):
            if any(
                r["set"] == name and r["geometry"] == geometry and (geometry != "tile" or r["tile_scale"] == scale)
                for r in rows
            ):
                continue
            subsets = dict(kv.split("=") for kv in args.test.split(",") if kv)
            n_test = int(subsets[name]) if name in subsets else None
            row = {"set": name, **run_one(data, geometry, args.train, args.coreset, scale, args.threads, n_test=n_test)}
            row["date"] = time.strftime("%Y-%m-%d", time.gmtime())
            row["cpus"] = os.cpu_count()
            row["load_avg"] = round(os.getloadavg()[0], 2)
            row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append(row)
            out.write_text(json.dumps(rows, indent=2))
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(markdown(rows))
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| data | geometry | image AUROC | pixel AUROC | AUPRO@0.3 | images/s | img/CPU-s | fit s | bank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        geo = r["geometry"] if r["geometry"] != "tile" or r["tile_scale"] == 1.0 else f"tile@{r['tile_scale']:g}x"
        lines.append(
            f"| {r['set']} | {geo} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
            f"{r['aupro']:.3f} | {r['images_per_s']:.2f} | {r['images_per_cpu_s']:.2f} | {r['fit_s']:.0f} | "
            f"{r['bank_size']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
