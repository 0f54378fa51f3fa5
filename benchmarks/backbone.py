"""Backbone forward pass: timm's graph against the optimised one `load_backbone` runs by default.

For each backbone (offline ImageNet weights), a batch of random images at the model input size goes
through four variants of the same weights: timm's graph as loaded (`optimize=False`), channels-last
only, batch norms folded only, and both (the default). It prints the best and median wall ms per image
over the repeats and the largest difference of each variant's features from timm's, relative to their
maximum.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/backbone.py --out runs/bench/backbone.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from patchaudit.workers.backbones import load_backbone  # noqa: E402
from patchaudit.workers.inference_graph import fold_batchnorms  # noqa: E402

DEFAULT_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite2", "mobilenetv2_100")


def variants(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, bool]]:
    """name -> (module, channels_last input) for the four graphs of the same weights."""
    folded = copy.deepcopy(model)
    n = fold_batchnorms(folded)
    if n == 0:
        raise SystemExit("no batch norm folded: nothing to compare")
    return {
        "timm": (model, False),
        "channels_last": (copy.deepcopy(model).to(memory_format=torch.channels_last), True),
        "folded": (folded, False),
        "folded+channels_last (default)": (copy.deepcopy(folded).to(memory_format=torch.channels_last), True),
    }


def time_forward(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[list[float], list[torch.Tensor]]:
    """(wall seconds per pass, features of the last pass) after two warm-up passes."""
    times = []
    with torch.inference_mode():
        for _ in range(2):
            out = module(x)
        for _ in range(repeats):
            t = time.perf_counter()
            out = module(x)
            times.append(time.perf_counter() - t)
    return times, list(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES))
    p.add_argument("--layers", default="2,3", help="timm out_indices (default: PatchCore's stride 8 and 16)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    layers = tuple(int(i) for i in args.layers.split(","))
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "size": args.size,
        "layers": list(layers),
        "load_avg": list(os.getloadavg()),
        "backbones": {},
    }
    for name in args.backbones.split(","):
        plain = load_backbone(name, layers, allow_hub=False, optimize=False)
        rows, ref = {}, None
        for label, (module, cl) in variants(plain.model).items():
            xin = x.contiguous(memory_format=torch.channels_last) if cl else x
            times, feats = time_forward(module, xin, args.repeats)
            ref = ref if ref is not None else feats
            diff = max(float((f - r).abs().max() / r.abs().max()) for f, r in zip(feats, ref))
            rows[label] = {
                "best_ms_per_image": min(times) / args.batch * 1e3,
                "median_ms_per_image": statistics.median(times) / args.batch * 1e3,
                "max_rel_diff_vs_timm": diff,
            }
            print(
                f"{name:<24} {label:<32} best {rows[label]['best_ms_per_image']:6.1f}  median "
                f"{rows[label]['median_ms_per_image']:6.1f} ms/img   features vs timm {diff:.1e}",
                flush=True,
            )
        result["backbones"][name] = rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
