"""SimpleNet training variants on one category's cached features: the held-out normal rule and test metrics.

    python benchmarks/simplenet_variants.py embed --data ../shared/data/mvtec_ad/bottle --out runs/sn/bottle.pt [--size 256]
    python benchmarks/simplenet_variants.py train --feats runs/sn/bottle.pt --feature-scale global --noise 0.1 \
        [--steps 1000] [--hidden 256] [--heldout]

`embed` runs the backbone once (configs/simplenet_lite0.yaml: lite0, layers 2+3, 256x256, 3x3
neighbourhoods) over train/good and the test split and stores the patch features and the masks resized to
256x256. `train` trains the adaptor and discriminator exactly as `fit` trains its final model
(workers/simplenet.train_head, one thread) on all train/good features and prints image AUROC, pixel AUROC
and AUPRO with the maps at 256x256 (`eval` measures at the stored image's size; for the old default the
two agreed to three decimals). `--heldout` first applies the rule the noise std is chosen by, on normal
images only: fit on a seeded 80% of train/good, report the share of the other 20%'s patches the
discriminator puts on the anomalous side (the rule: the smallest std that flags at most 1%).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "simplenet_lite0.yaml"


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def embed(data: str, out: str, size: int | None = None) -> None:
    import numpy as np
    import torch
    import yaml
    from PIL import Image

    from patchaudit.store.objects import open_store
    from patchaudit.workers.config import model_config_from_dict
    from patchaudit.workers.datasets import discover
    from patchaudit.workers.fit import embed_images
    from patchaudit.workers.model import backbone_for
    from patchaudit.workers.simplenet import SimpleNetModel

    over: dict = {"device": "cpu"} | ({"image_size": [size, size]} if size else {})
    cfg = model_config_from_dict(yaml.safe_load(CONFIG.read_text())["model"] | over)
    model = SimpleNetModel(cfg, backbone_for(cfg, torch.device("cpu")))
    store = open_store(data)
    ds = discover(store)
    errors: list[tuple[str, str]] = []
    test = sorted(ds.test, key=lambda t: t.key)
    c0 = _cpu()
    with torch.inference_mode():
        _, train = embed_images(model, store, sorted(ds.train_keys), 2, errors)
        _, tested = embed_images(model, store, [t.key for t in test], 2, errors)
    if errors:
        raise SystemExit(f"images that did not decode: {errors[:3]}")
    h, w = cfg.image_size
    masks = []
    for t in test:
        if t.mask_key is None:
            masks.append(np.zeros((h, w), bool))
            continue
        m = Image.open(store.open_read(t.mask_key)).convert("L").resize((w, h), Image.Resampling.BILINEAR)
        masks.append(np.asarray(m) >= 128)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "train": torch.cat(train),  # (N_train, D, h, w)
            "test": torch.cat(tested),  # (N_test, D, h, w)
            "labels": [t.label for t in test],
            "types": [t.defect_type for t in test],
            "masks": np.stack(masks),  # (N_test, H, W) bool at the input size
            "input_size": (h, w),
        },
        out,
    )
    print(f"embedded {len(train)} train and {len(test)} test images in {_cpu() - c0:.0f} CPU s -> {out}")


def train(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from patchaudit.evaluation import metrics
    from patchaudit.workers.features import flatten_patches
    from patchaudit.workers.maps import smooth_maps
    from patchaudit.workers.simplenet import feature_scale, train_head

    torch.set_num_threads(1)  # as fit trains (simplenet.train_threads: 1)
    d = torch.load(args.feats, weights_only=False)
    size = tuple(d["input_size"])

    def fit(imgs: torch.Tensor):
        f = flatten_patches(imgs).float()  # (N*h*w, D)
        mean, std = feature_scale(f, args.feature_scale)
        head, losses = train_head(
            (f - mean) / std, args.hidden, args.noise, args.steps, 2048, 1e-4, 2e-4, 0.5, args.seed
        )
        return head, mean, std, losses

    def grid(fitted, imgs: torch.Tensor) -> torch.Tensor:  # (B, D, h, w) -> (B, h, w) patch scores
        head, mean, std, _ = fitted
        b, _, h, w = imgs.shape
        with torch.no_grad():
            return (-head(head.adaptor((flatten_patches(imgs).float() - mean) / std))).view(b, h, w)

    out: dict = {k: v for k, v in vars(args).items() if k != "func"}
    tr = d["train"]
    if args.heldout:
        perm = np.random.default_rng(args.seed).permutation(tr.shape[0])
        k = int(0.8 * tr.shape[0])
        g = grid(fit(tr[perm[:k]]), tr[perm[k:]])
        out["heldout_patches_flagged"] = float((g > 0).float().mean())
    c0 = _cpu()
    fitted = fit(tr)
    out["train_cpu_s"] = _cpu() - c0
    out["loss_first"], out["loss_last"] = fitted[3][0], fitted[3][-1]
    smooth = smooth_maps(grid(fitted, d["test"]), size, 4.0).numpy()  # map_sigma 4, as fit/eval
    scores = smooth.reshape(len(smooth), -1).max(1)
    records = [
        metrics.EvalRecord(int(lab), t, float(s), m, g)
        for lab, t, s, m, g in zip(d["labels"], d["types"], scores, smooth, d["masks"])
    ]
    ev = metrics.evaluate(records, float(np.median(scores)))
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_auroc_within_defective", "pixel_auroc_vs_good"):
        out[key] = ev[key]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--size", type=int, help="input side in px (default: the config's image_size)")
    t = sub.add_parser("train")
    t.add_argument("--feats", required=True)
    t.add_argument("--feature-scale", choices=("global", "channel"), default="global")
    t.add_argument("--noise", type=float, default=0.1)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--heldout", action="store_true")
    args = p.parse_args()
    if args.command == "embed":
        embed(args.data, args.out, args.size)
    else:
        print(json.dumps(train(args)))


if __name__ == "__main__":
    main()
