"""Magnetic tile: how much do near-duplicate shots shared by train and test move the metrics?

    python benchmarks/near_duplicates.py [--data DIR] [--config YAML] [--radius 50] [--out results.json]

The magnetic tile defect set (MTD) has no official split; the shared copy split its defect-free images at
random. Its file names are `exp<k>_num_<n>`, and shots with nearby <n> (in any exp<k>) show the same
tile: most test/good images have a train/good image within a few dozen of their <n>, while the defective
images, taken from other tiles, sit hundreds away. A model that has memorised a tile's other shots
scores that tile's test shots low, which flatters image AUROC and shifts the pixel scores of good
images against those of defective ones.

This script measures the effect with everything else equal: it fits `--config` on the whole
train/good (as `patchaudit fit` does) and once on train/good minus every image whose <n> lies within
`--radius` of any test image's <n> (a grouped split), and evaluates both on the same, unchanged test
split. A third fit drops as many train images at random (`--seed`): the control for "fewer training
images". The filtered copies are made of hard links (copies across filesystems) in a temporary folder.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = os.path.join("..", "shared", "data", "magnetic_tile", "magnetic_tile")
DEFAULT_CONFIG = os.path.join("configs", "default.yaml")
_NUM = re.compile(r"_num_(\d+)")


def shot_number(name: str) -> int | None:
    """The <n> of an `exp<k>_num_<n>.<ext>` file name, or None for other names."""
    m = _NUM.search(os.path.basename(name))
    return int(m.group(1)) if m else None


def near_duplicates(train: Iterable[str], test: Iterable[str], radius: int) -> set[str]:
    """Train names whose shot number lies within `radius` of some test name's (names without one never match)."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    test_nums = sorted(n for n in map(shot_number, test) if n is not None)
    if not test_nums:
        return set()
    out = set()
    for name in train:
        n = shot_number(name)
        if n is None:
            continue
        i = bisect.bisect_left(test_nums, n - radius)
        if i < len(test_nums) and test_nums[i] <= n + radius:
            out.add(name)
    return out


def gap_to_train(train: Iterable[str], names: Iterable[str]) -> list[int]:
    """Per name (with a shot number): the distance to the nearest train shot number."""
    nums = sorted(n for n in map(shot_number, train) if n is not None)
    out = []
    for name in names:
        n = shot_number(name)
        if n is None or not nums:
            continue
        i = bisect.bisect_left(nums, n)
        out.append(min(abs(nums[j] - n) for j in (i - 1, i) if 0 <= j < len(nums)))
    return out


def filtered_copy(src: Path, dst: Path, drop: set[str]) -> int:
    """Mirror `src` into `dst` with links, leaving out train/good/<name> for names in `drop`; files linked."""
    n = 0
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        if rel.parts[:2] == ("train", "good") and f.name in drop:
            continue
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, out)
        except OSError:  # another filesystem
            out.write_bytes(f.read_bytes())
        n += 1
    return n


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("image_auroc", "pixel_auroc", "aupro", "f1", "precision", "recall")
    return {k: metrics.get(k) for k in keys} | {
        "per_defect": {
            t: {k: v.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}
            for t, v in metrics.get("per_defect", {}).items()
        }
    }


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    def f(v: Any) -> str:
        return "   -  " if v is None else f"{v:.4f}"

    lines = [f"{'train set':<28} {'subset':<10} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7}"]
    for label, m in rows:
        lines.append(f"{label:<28} {'all':<10} {f(m['image_auroc']):>11} {f(m['pixel_auroc']):>11} {f(m['aupro']):>7}")
        for t, v in m["per_defect"].items():
            lines.append(f"{'':<28} {t:<10} {f(v['image_auroc']):>11} {f(v['pixel_auroc']):>11} {f(v['aupro']):>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--radius", type=int, default=50, help="shot-number distance that counts as the same tile")
    p.add_argument("--seed", type=int, default=0, help="seed of the control's random drop")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from patchaudit.scheduler import local
    from patchaudit.scheduler.config import load_config

    data = Path(args.data).resolve()
    train = sorted(f.name for f in (data / "train" / "good").iterdir() if f.is_file())
    test = sorted(str(f.relative_to(data / "test")) for f in (data / "test").rglob("*") if f.is_file())
    good_test = [t for t in test if t.startswith("good" + os.sep)]
    defect_test = [t for t in test if not t.startswith("good" + os.sep)]
    drop = near_duplicates(train, test, args.radius)
    config = load_config(args.config)
    gaps = {"good": gap_to_train(train, good_test), "defective": gap_to_train(train, defect_test)}
    result: dict[str, Any] = {
        "data": str(args.data),
        "config": args.config,
        "radius": args.radius,
        "n_train": len(train),
        "n_dropped": len(drop),
        "median_gap_to_train": {k: (sorted(v)[len(v) // 2] if v else None) for k, v in gaps.items()},
        "share_within_radius": {k: (sum(g <= args.radius for g in v) / len(v) if v else None) for k, v in gaps.items()},
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="near_dup_") as tmp:
        # Control: as many train images dropped at random, so fewer training images alone can be told apart.
        control = set(random.Random(args.seed).sample(train, len(drop)))
        result["control_near_dups_dropped"] = len(control & drop)
        variants = [
            ("all train/good", data, None),
            (f"grouped (-{len(drop)} near dups)", Path(tmp) / "data", drop),
            (f"random (-{len(control)}, control)", Path(tmp) / "control", control),
        ]
        for label, root, dropped in variants:
            if dropped is not None:
                filtered_copy(data, root, dropped)
            model = Path(tmp) / f"model{len(rows)}"
            fit = local.fit(config, str(root), str(model))
            metrics = local.evaluate(config, str(root), str(model), None)
            summary = _summary(metrics) | {"n_fit_images": fit["n_fit_images"], "threshold": fit["threshold"]}
            result[label] = summary
            rows.append((label, summary))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict) or "per_defect" not in v}, indent=1))
    print(format_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no runs/
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
