"""Score one fitted PatchCore model in fp32, bf16 and fp16 (`model.precision`): speed and score differences.

    python benchmarks/precision.py [--data DIR] [--config YAML] [--model DIR] [--test N]
                                   [--precisions fp32 bf16 fp16] [--refine 8] [--out results.json]

The model is `--model`, or fitted here (fp32, the config's settings, all train images). Each precision
then scores the same test images with the same bank: the backbone under autocast in that type and the
torch k-NN's distance matmul in it, with the best `--refine` candidates re-ranked by exact fp32
distances (what `model.precision` does). Reported per precision: image AUROC, the largest absolute and
relative image-score difference from fp32, how many images change their anomalous flag, and the CPU
time per image of the backbone (`feature_ms`) and the k-NN (`knn_ms`), best of `--reps` passes.
"""

from __future__ import annotations

import argparse
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
DEFAULT_DATA = os.path.join("..", "shared", "data", "mvtec_ad", "bottle")
DEFAULT_CONFIG = os.path.join("configs", "default.yaml")


def set_precision(model: Any, precision: str, refine: int) -> None:
    """Switch a loaded PatchCore model's backbone and torch bank to `precision` (the bank stays the same)."""
    from patchaudit.workers.knn import ShardedIndex, TorchShard

    model.backbone.precision = precision
    shards = []
    for s in model.index.shards:
        shards.append(
            TorchShard(
                s.vectors(),
                s.offset,
                str(s.device) if hasattr(s, "device") else "cpu",
                precision=precision,
                refine=refine,
            )
        )
    model.index = ShardedIndex(shards)


def score_once(model: Any, store: Any, keys: list[str]) -> dict[str, Any]:
    from patchaudit.workers.pipeline import score_keys

    c0, w0 = time.process_time(), time.perf_counter()
    results = list(score_keys(model, store.read_bytes, keys, threads=1))
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    bad = [r for r in results if r.error]
    if bad:
        raise SystemExit(f"{len(bad)} test images failed to score, e.g. {bad[0].key}: {bad[0].error}")
    return {
        "scores": np.array([r.score for r in results]),
        "feature_ms": float(np.mean([r.feature_ms for r in results])),
        "knn_ms": float(np.mean([r.knn_ms for r in results])),
        "cpu_ms_per_image": cpu * 1e3 / len(results),
        "wall_ms_per_image": wall * 1e3 / len(results),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--model", help="a fitted PatchCore model dir (default: fit one here into a temp dir)")
    p.add_argument("--train", type=int, default=0, help="fit on the first N train images (0: all)")
    p.add_argument("--test", type=int, default=0, help="score the first N test images (0: all)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--refine", type=int, default=8)
    p.add_argument("--reps", type=int, default=2, help="scoring passes per precision; the fastest counts")
    p.add_argument("--out")
    args = p.parse_args(argv)

    import torch

    from patchaudit.evaluation.metrics import auroc
    from patchaudit.scheduler.config import load_config
    from patchaudit.store.objects import open_store
    from patchaudit.workers.datasets import discover, require_test, require_train
    from patchaudit.workers.fit import fit_model
    from patchaudit.workers.model import load_model

    store = open_store(args.data)
    ds = discover(store)
    test = require_test(ds)
    if args.test:  # keep both classes: interleave good and defective
        good, bad = [t for t in test if t.label == 0], [t for t in test if t.label == 1]
        test = good[: max(1, args.test // 2)] + bad[: max(1, args.test - args.test // 2)]
    keys, labels = [t.key for t in test], np.array([t.label for t in test])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            config = load_config(args.config).model
            train = require_train(ds)
            train = train[: args.train] if args.train else train
            model, _ = fit_model(config, store, train)
            model_dir = os.path.join(tmp, "model")
            model.save(model_dir)
        model = load_model(model_dir, device="cpu", knn_backend="torch")
        rows: dict[str, Any] = {}
        ref = None
        for precision in args.precisions:
            set_precision(model, precision, args.refine)
            runs = [score_once(model, store, keys) for _ in range(args.reps)]
            best = min(runs, key=lambda r: r["cpu_ms_per_image"])
            scores = best.pop("scores")
            if ref is None:
                ref = scores
            diff = np.abs(scores - ref)
            rows[precision] = {
                **best,
                "image_auroc": auroc(labels, scores),
                "max_abs_score_diff": float(diff.max()),
                "max_rel_score_diff": float((diff / np.maximum(np.abs(ref), 1e-12)).max()),
                "flags_changed": int(((scores >= model.threshold) != (ref >= model.threshold)).sum()),
            }
            r = rows[precision]
            print(
                f"{precision}: AUROC {r['image_auroc']:.4f}  max|ds| {r['max_abs_score_diff']:.2e} "
                f"(rel {r['max_rel_score_diff']:.2e})  flags changed {r['flags_changed']}  backbone "
                f"{r['feature_ms']:.1f} ms/img  k-NN {r['knn_ms']:.1f} ms/img  total cpu "
                f"{r['cpu_ms_per_image']:.1f} ms/img",
                file=sys.stderr,
            )
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "images": len(keys),
        "refine": args.refine,
        "model": model.config.backbone,
        "bank_size": getattr(model, "bank_size", None),
        "precisions": rows,
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
