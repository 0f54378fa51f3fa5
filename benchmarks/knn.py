"""Exact 1-NN backends on a fitted model's real bank and real queries: time per image, and agreement.

    python benchmarks/knn.py [--model DIR] [--data DIR] [--images 32] [--reps 5] [--out results.json]

The bank is the model's (`--model`, or a model fitted here from `--data` with `configs/default.yaml`:
bottle gives 19,251 x 152); the queries are the patch embeddings of the first `--images` test images,
computed as `eval` computes them. Timed, in this process, one after another (median and best of `--reps`,
ms per image of 1,024 patches):

- `faiss-flat`: faiss `IndexFlatL2` over the same vectors (what `knn_backend: faiss` loads);
- `torch` with the default blocks (what `knn_backend: auto` loads for an exact model on CPU), and with
  other `query_block x chunk` sizes (`--blocks`).

Agreement with `faiss-flat`: the share of queries whose nearest id differs (near-ties in float32) and the
largest |distance difference| (both backends recompute the found pair's distance exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = os.path.join("..", "shared", "data", "mvtec_ad", "bottle")
DEFAULT_CONFIG = os.path.join("configs", "default.yaml")


def parse_blocks(text: str) -> list[tuple[int, int]]:
    """ "2048x1024,4096x512" -> [(2048, 1024), (4096, 512)] (query block x bank chunk)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        q, _, c = part.partition("x")
        if not (q.isdigit() and c.isdigit() and int(q) > 0 and int(c) > 0):
            raise SystemExit(f"--blocks: {part!r} is not QUERYxCHUNK (two positive integers)")
        out.append((int(q), int(c)))
    return out


def timed(fn, reps: int, n_images: int) -> dict[str, float]:
    fn()  # warm-up: allocations, thread pools
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3 / n_images)
    return {"median_ms_per_image": statistics.median(times), "best_ms_per_image": min(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a fitted PatchCore model dir (default: fit one from --data into a temp dir)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"MVTec-style category dir (default {DEFAULT_DATA})")
    p.add_argument("--images", type=int, default=32, help="test images whose patches are the queries")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--blocks",
        default="1024x1024,4096x1024,2048x512,2048x4096",
        help="other torch query_block x chunk sizes to time",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    blocks = parse_blocks(args.blocks)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from patchaudit.scheduler.config import load_config
    from patchaudit.scheduler.local import fit
    from patchaudit.store.objects import open_store
    from patchaudit.workers.datasets import discover, require_test
    from patchaudit.workers.features import flatten_patches
    from patchaudit.workers.fit import train_batches
    from patchaudit.workers.knn import FaissShard, TorchShard
    from patchaudit.workers.model import load_model

    with tempfile.TemporaryDirectory(prefix="pa_knn_") as tmp:
        model_dir = args.model
        if model_dir is None:
            print(f"fitting a model on {args.data} ...", flush=True)
            model_dir = os.path.join(tmp, "model")
            fit(load_config(DEFAULT_CONFIG), args.data, model_dir)
        model = load_model(model_dir, knn_backend="faiss")
        if model.method != "patchcore":
            raise SystemExit(f"{model_dir}: method {model.method!r}; this benchmark needs a PatchCore model")
        bank = np.concatenate([s.vectors() for s in model.index.shards])
        store = open_store(args.data)
        keys = [t.key for t in require_test(discover(store))][: args.images]
        errors: list[tuple[str, str]] = []
        with torch.inference_mode():
            q = torch.cat(
                [flatten_patches(model.embed(x)).float().cpu() for x in train_batches(model, store, keys, 2, errors)]
            )
    n_img = len(keys) - len(errors)
    qn = q.numpy()
    flat = FaissShard.build(bank)
    ref_d, ref_i = flat.search(qn, 1)
    rows: dict[str, Any] = {"faiss-flat": timed(lambda: flat.search(qn, 1), args.reps, n_img)}
    default = TorchShard(bank)
    for name, shard in [(f"torch {default.query_block}x{default.chunk} (default)", default)] + [
        (f"torch {qb}x{c}", TorchShard(bank, chunk=c, query_block=qb)) for qb, c in blocks
    ]:
        with torch.inference_mode():
            rows[name] = timed(lambda s=shard: s.search_tensor(q, 1), args.reps, n_img)
            d, i = shard.search(qn, 1)
        rows[name]["nn_id_differs_share"] = float(np.mean(i[:, 0] != ref_i[:, 0]))
        rows[name]["max_abs_dist_diff"] = float(np.abs(d - ref_d).max())
    result = {
        "bank": list(bank.shape),
        "queries": int(q.shape[0]),
        "images": n_img,
        "torch_threads": torch.get_num_threads(),
        "backends": rows,
    }
    print(
        f"bank {bank.shape[0]} x {bank.shape[1]}, {q.shape[0]} queries from {n_img} test images, "
        f"{result['torch_threads']} threads"
    )
    for name, r in rows.items():
        agree = (
            f"  NN id differs {r['nn_id_differs_share']:.4%}, max |d dist| {r['max_abs_dist_diff']:.2e}"
            if "max_abs_dist_diff" in r
            else ""
        )
        print(f"  {name:<32} {r['median_ms_per_image']:8.1f} ms/img (best {r['best_ms_per_image']:.1f}){agree}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
