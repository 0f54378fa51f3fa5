"""The greedy coreset on one category's real patch features: time per method, and whether they agree.

    python benchmarks/coreset.py [--data DIR] [--config YAML] [--methods batched,pruned,dense]
                                 [--dense-steps 300] [--out results.json]

Extracts the PatchCore patch features of the fit images exactly as `patchaudit fit` does (same
calibration hold-out, preprocessing and embedding), then runs `patchaudit.workers.coreset.greedy_coreset` with
each method on the same features, projection and seed, selecting the config's coreset ratio:

- `batched` (the default) and `pruned` run to the end;
- `dense` (the textbook loop) costs the same per step at every step (one pass over all points), so it
  runs `--dense-steps` steps and its full time is extrapolated (marked `extrapolated`).

Agreement: each method's selection is compared with the first method's: the share of picks in common
and the length of the identical prefix (float32 ties between equally far points may reorder them; the
unit tests check that any difference is such a tie).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = os.path.join("..", "shared", "data", "mvtec_ad", "bottle")
DEFAULT_CONFIG = os.path.join("configs", "default.yaml")


def agreement(reference: list[int], other: list[int]) -> dict[str, Any]:
    """Share of `other`'s picks that `reference` also made, over the shorter one; identical prefix length."""
    n = min(len(reference), len(other))
    prefix = next((i for i in range(n) if reference[i] != other[i]), n)
    return {
        "compared": n,
        "same_set_share": len(set(reference[:n]) & set(other[:n])) / n if n else 1.0,
        "identical_prefix": prefix,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--methods", default="batched,pruned,dense")
    p.add_argument("--dense-steps", type=int, default=300, help="steps of the textbook loop to time")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from patchaudit.scheduler.config import load_config
    from patchaudit.store.objects import open_store
    from patchaudit.workers.coreset import METHODS, coreset_size, greedy_coreset
    from patchaudit.workers.datasets import discover, require_train
    from patchaudit.workers.fit import split_calibration, train_batches
    from patchaudit.workers.model import backbone_for, resolve_device
    from patchaudit.workers.registry import model_class

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; valid: {', '.join(METHODS)}")
    config = load_config(args.config).model
    if config.method != "patchcore":
        raise SystemExit(f"{args.config}: method {config.method!r}; the coreset belongs to patchcore")
    store = open_store(args.data)
    fit_keys, _ = split_calibration(
        require_train(discover(store)), 0.1, config.seed
    )  # the held-out protocol it was measured with
    torch.manual_seed(config.seed)
    model = model_class("patchcore")(config, backbone_for(config, resolve_device(config.device)))
    t0 = time.perf_counter()
    errors: list[tuple[str, str]] = []
    with torch.inference_mode():
        feats = model.patch_features(train_batches(model, store, fit_keys, 2, errors)).to(model.device)
    pc = config.patchcore
    n_select = coreset_size(feats.shape[0], pc.coreset_ratio)
    result: dict[str, Any] = {
        "data": args.data,
        "config": args.config,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "fit_images": len(fit_keys) - len(errors),
        "patches": int(feats.shape[0]),
        "dim": int(feats.shape[1]),
        "projection_dim": pc.coreset_projection_dim,
        "n_select": n_select,
        "features_s": time.perf_counter() - t0,
        "methods": {},
    }
    print(
        f"{args.data}: {result['fit_images']} images, {feats.shape[0]} x {feats.shape[1]} patches -> {n_select}, "
        f"projection {pc.coreset_projection_dim}, {result['torch_threads']} torch threads"
    )
    picks: dict[str, list[int]] = {}
    for method in methods:
        steps = min(n_select, args.dense_steps) if method == "dense" else n_select
        t = time.perf_counter()
        sel = greedy_coreset(feats, steps, projection_dim=pc.coreset_projection_dim, seed=config.seed, method=method)
        seconds = time.perf_counter() - t
        picks[method] = sel.cpu().tolist()
        row = {
            "steps": steps,
            "seconds": seconds,
            "ms_per_step": 1e3 * seconds / steps,
            "full_seconds": seconds * n_select / steps,
            "extrapolated": steps < n_select,
        }
        if method != methods[0]:
            row["vs_" + methods[0]] = agreement(picks[methods[0]], picks[method])
        result["methods"][method] = row
        extra = f" (timed {steps} steps, extrapolated)" if row["extrapolated"] else ""
        vs = row.get("vs_" + methods[0])
        agree = (
            (
                f"; vs {methods[0]}: {vs['same_set_share']:.4f} same picks, identical first {vs['identical_prefix']}"
                f" of {vs['compared']}"
            )
            if vs
            else ""
        )
        print(
            f"  {method:<8} {row['full_seconds']:9.1f} s  {row['ms_per_step']:7.2f} ms/step{extra}{agree}", flush=True
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no runs/
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
