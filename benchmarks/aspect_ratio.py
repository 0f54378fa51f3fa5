"""Does keeping the aspect ratio help? PatchCore with the default stretch against a letterbox resize.

The magnetic-tile images range from 0.36 to 2.7 in aspect ratio; stretching each to 256x256 changes the
texture's scale by up to 7x between the two axes. This experiment fits the default PatchCore (lite0,
stride 8+16, 10% coreset, same held-out calibration split) twice on the same training images:

- `stretch`: each image resized to the input size, as `patchaudit.workers.decode` does;
- `letterbox`: each image resized to fit inside the input size with its aspect ratio kept, centred on a
  canvas of the backbone's mean colour; only patches whose centre lies on the image enter the memory
  bank and the image score; the patch grid's outside cells take their nearest inside value, and the
  map is upsampled, cropped to the image, blurred (sigma 4) and resized to the original size.

Both are evaluated with `patchaudit.evaluation.metrics.evaluate` on the test split. It is an experiment, not a
product option: it was run once and measured worse on image AUROC and AUPRO (benchmarks/README.md).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/aspect_ratio.py --out runs/bench/aspect_ratio.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from patchaudit.evaluation.metrics import EvalRecord, evaluate  # noqa: E402
from patchaudit.store.objects import open_store  # noqa: E402
from patchaudit.workers.backbones import load_backbone  # noqa: E402
from patchaudit.workers.coreset import coreset_size, greedy_coreset  # noqa: E402
from patchaudit.workers.datasets import discover  # noqa: E402
from patchaudit.workers.features import patchcore_embed, to_tensor_batch  # noqa: E402
from patchaudit.workers.fit import split_calibration  # noqa: E402
from patchaudit.workers.knn import ShardedIndex, build_shards  # noqa: E402
from patchaudit.workers.maps import blur  # noqa: E402

Box = tuple[int, int, int, int]  # (top, left, height, width) of the image on the input canvas


def place(img: Image.Image, size: tuple[int, int], mode: str, pad: tuple[int, int, int]) -> tuple[np.ndarray, Box]:
    """RGB image -> ((H, W, 3) uint8 backbone input, where the image lies on it)."""
    th, tw = size
    if mode == "stretch":
        return np.asarray(img.resize((tw, th), Image.BILINEAR)), (0, 0, th, tw)
    s = min(th / img.height, tw / img.width)
    nh, nw = max(1, round(img.height * s)), max(1, round(img.width * s))
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas = Image.new("RGB", (tw, th), pad)
    canvas.paste(img.resize((nw, nh), Image.BILINEAR), (left, top))
    return np.asarray(canvas), (top, left, nh, nw)


def inside_cells(box: Box, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(gh, gw) bool: patch cells whose centre lies on the image."""
    top, left, nh, nw = box
    (th, tw), (gh, gw) = size, grid
    cy = (torch.arange(gh) + 0.5) * (th / gh)
    cx = (torch.arange(gw) + 0.5) * (tw / gw)
    return ((cy >= top) & (cy < top + nh))[:, None] & ((cx >= left) & (cx < left + nw))[None, :]


def grid_to_map(
    grid: torch.Tensor, box: Box, size: tuple[int, int], sigma: float, original: tuple[int, int]
) -> np.ndarray:
    """(gh, gw) patch scores -> (H, W) float32 map of the original image."""
    inside = inside_cells(box, size, tuple(grid.shape))
    rows = torch.nonzero(inside.any(1))[:, 0]
    cols = torch.nonzero(inside.any(0))[:, 0]
    ri = torch.arange(grid.shape[0]).clamp(int(rows[0]), int(rows[-1]))
    ci = torch.arange(grid.shape[1]).clamp(int(cols[0]), int(cols[-1]))
    filled = grid[ri][:, ci]  # outside cells take the nearest inside row/column
    up = F.interpolate(filled[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    top, left, nh, nw = box
    smooth = blur(up[top : top + nh, left : left + nw][None], sigma)[0]
    return F.interpolate(smooth[None, None], size=original, mode="bilinear", align_corners=False)[0, 0].numpy()


class Experiment:
    def __init__(self, data: str, mode: str, size: tuple[int, int], batch: int = 16) -> None:
        self.store = open_store(data)
        self.ds = discover(self.store)
        self.mode, self.size, self.batch = mode, size, batch
        self.bb = load_backbone("tf_efficientnet_lite0", (2, 3), allow_hub=False)
        self.pad = tuple(int(round(m * 255)) for m in self.bb.mean)
        self.index: ShardedIndex | None = None

    def open(self, key: str) -> Image.Image:
        return Image.open(io.BytesIO(self.store.read_bytes(key)))

    def embedded(self, keys: list[str]):
        """Yield (embedding (D, gh, gw), original (h, w), box) per image."""
        for i in range(0, len(keys), self.batch):
            imgs = [self.open(k).convert("RGB") for k in keys[i : i + self.batch]]
            placed = [place(im, self.size, self.mode, self.pad) for im in imgs]
            x = to_tensor_batch([p[0] for p in placed], self.bb.mean, self.bb.std)
            with torch.inference_mode():
                emb = patchcore_embed(self.bb.extract(x), 3, None)
            for j, im in enumerate(imgs):
                yield emb[j], (im.height, im.width), placed[j][1]

    def fit(self, keys: list[str]) -> dict[str, Any]:
        t0 = time.perf_counter()
        feats = torch.cat(
            [e.permute(1, 2, 0)[inside_cells(box, self.size, tuple(e.shape[1:]))] for e, _, box in self.embedded(keys)]
        )  # (N inside patches, D)
        picks = greedy_coreset(feats, coreset_size(feats.shape[0], 0.1), projection_dim=128, seed=0, method="batched")
        self.index = ShardedIndex(build_shards(feats[picks].numpy(), 1))
        return {"patches": int(feats.shape[0]), "bank": int(len(picks)), "fit_s": time.perf_counter() - t0}

    def score(self, keys: list[str]) -> list[tuple[float, np.ndarray]]:
        out = []
        for e, original, box in self.embedded(keys):
            d, gh, gw = e.shape
            dist, _ = self.index.search_torch(e.permute(1, 2, 0).reshape(-1, d).float(), 1)
            grid = dist[:, 0].clamp(min=0).sqrt().view(gh, gw)
            score = float(grid[inside_cells(box, self.size, (gh, gw))].max())
            out.append((score, grid_to_map(grid, box, self.size, 4.0, original)))
        return out


def run(data: str, mode: str, size: tuple[int, int]) -> dict[str, Any]:
    exp = Experiment(data, mode, size)
    fit_keys, cal_keys = split_calibration(exp.ds.train_keys, 0.1, 0)
    info = exp.fit(fit_keys)
    cal = np.array([s for s, _ in exp.score(cal_keys)])
    threshold = float(np.quantile(cal, 0.99))
    records = []
    for item, (score, amap) in zip(exp.ds.test, exp.score([t.key for t in exp.ds.test])):
        mask = None
        if item.mask_key is not None:
            mask = np.asarray(exp.open(item.mask_key).convert("L")) > 127
        records.append(EvalRecord(item.label, item.defect_type, score, amap, mask))
    metrics = evaluate(records, threshold)
    keep = ("image_auroc", "pixel_auroc", "aupro", "pixel_auroc_within_defective", "pixel_auroc_vs_good")
    return {
        "mode": mode,
        "size": list(size),
        **info,
        **{k: metrics[k] for k in keep},
        "per_defect": {t: {k: v[k] for k in keep} for t, v in metrics["per_defect"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "magnetic_tile", "magnetic_tile"))
    p.add_argument("--modes", default="stretch,letterbox")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results = []
    for mode in args.modes.split(","):
        r = run(args.data, mode, (args.size, args.size))
        results.append(r)
        print(
            f"{mode:<10} image AUROC {r['image_auroc']:.4f}  pixel AUROC {r['pixel_auroc']:.4f}  "
            f"AUPRO {r['aupro']:.4f}  within {r['pixel_auroc_within_defective']:.4f}  "
            f"vs good {r['pixel_auroc_vs_good']:.4f}  (bank {r['bank']} of {r['patches']} patches, "
            f"fit {r['fit_s']:.0f} s)",
            flush=True,
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"data": args.data, "results": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
