"""What `model.jpeg_draft` does to accuracy: fit and evaluate one JPEG category with and without it.

    python benchmarks/jpeg_draft.py [--data DIR] [--to-jpeg] [--train N] [--out results.json]

`--data` is an MVTec-layout category. Its images are used as stored when they are JPEGs (magnetic tile);
with `--to-jpeg` (PNG categories such as bottle) a JPEG copy (quality 95) of every train and test image
is written to a temporary folder first, masks kept as PNG. The default config is fitted twice, with
`jpeg_draft` false and true, on the first `--train` train images (0: all), and each model scores the
test images decoded its own way. Reported: image AUROC, pixel AUROC, the decoded pixels' mean and largest
|difference| between the two ways, how many test images were decoded at a reduced scale, and the fit
and scoring time.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = os.path.join("..", "shared", "data", "magnetic_tile", "magnetic_tile")
DEFAULT_CONFIG = os.path.join("configs", "default.yaml")


def jpeg_copy(src: Path, dst: Path, quality: int = 95) -> None:
    """Every image under src/train and src/test as a JPEG under dst (same names, .jpg); masks copied."""
    from PIL import Image

    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(src)
        if rel.parts[0] == "ground_truth":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(path.read_bytes())
        elif rel.parts[0] in ("train", "test") and path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
            out = (dst / rel).with_suffix(".jpg")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(path).convert("RGB").save(out, format="JPEG", quality=quality)


def evaluate(config: Any, store: Any, train: list[str], test: list[Any]) -> dict[str, Any]:
    from patchaudit.evaluation.metrics import auroc, pixel_auroc
    from patchaudit.workers.fit import fit_model
    from patchaudit.workers.pipeline import score_keys

    t0 = time.process_time()
    model, _ = fit_model(config, store, train)
    fit_s = time.process_time() - t0
    t0 = time.process_time()
    results = list(score_keys(model, store.read_bytes, [t.key for t in test], keep_maps=True, threads=1))
    score_s = time.process_time() - t0
    labels = np.array([t.label for t in test])
    scores = np.array([r.score for r in results])
    masks, maps = [], []
    for t, r in zip(test, results):
        if t.label == 1 and t.mask_key is None:
            continue  # defective without a mask: out of the pixel metric
        if t.mask_key is not None:
            from PIL import Image

            mask = np.asarray(Image.open(io.BytesIO(store.read_bytes(t.mask_key))).convert("L")) > 127
        else:
            mask = np.zeros(r.amap.shape, dtype=bool)
        if mask.shape != r.amap.shape or (t.label == 1 and not mask.any()):
            continue  # empty masks of defective images stay out (the magnetic tile README says why)
        masks.append(mask)
        maps.append(r.amap)
    return {
        "image_auroc": auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps) if masks else None,
        "fit_cpu_s": fit_s,
        "score_cpu_ms_per_image": score_s * 1e3 / len(test),
        "errors": sum(r.error is not None for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--to-jpeg", action="store_true", help="evaluate a JPEG (q95) copy of the category")
    p.add_argument("--train", type=int, default=0, help="fit on the first N train images (0: all)")
    p.add_argument("--out")
    args = p.parse_args(argv)

    from patchaudit.scheduler.config import load_config
    from patchaudit.store.objects import open_store
    from patchaudit.workers.datasets import discover, require_test, require_train
    from patchaudit.workers.decode import Preprocess, decode_image

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data)
        if args.to_jpeg:
            jpeg_copy(data, Path(tmp))
            data = Path(tmp)
        store = open_store(str(data))
        ds = discover(store)
        train, test = require_train(ds), require_test(ds)
        train = train[: args.train] if args.train else train
        base = load_config(args.config).model
        rows = {}
        for draft in (False, True):
            config = dataclasses.replace(base, jpeg_draft=draft)
            rows[f"jpeg_draft={str(draft).lower()}"] = evaluate(config, store, train, test)
            print(f"jpeg_draft={draft}: {rows[f'jpeg_draft={str(draft).lower()}']}", file=sys.stderr)
        # pixel difference of the two decodes on the test images, and how many are really reduced
        full, fast = Preprocess(base.image_size), Preprocess(base.image_size, jpeg_draft=True)
        diffs, reduced = [], 0
        for t in test:
            raw = store.read_bytes(t.key)
            a, b = decode_image(raw, full).pixels, decode_image(raw, fast).pixels
            d = np.abs(a.astype(np.int16) - b.astype(np.int16))
            diffs.append((float(d.mean()), int(d.max())))
            reduced += int(d.any())
        out = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "data": Path(args.data).name + (" as JPEG q95" if args.to_jpeg else ""),
            "train_images": len(train),
            "test_images": len(test),
            "runs": rows,
            "pixel_diff": {
                "mean_abs": float(np.mean([m for m, _ in diffs])),
                "max_abs": max(x for _, x in diffs),
                "images_decoded_differently": reduced,
            },
        }
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
