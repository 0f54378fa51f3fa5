"""Throughput model: per-stage costs -> images/s, bottleneck and cost per million images for a cluster shape.

    python benchmarks/throughput_model.py [--measure] [--validate] [--shape G C D E] [--target 1000]
                                          [--format png|jpeg] [--out results.json]

A run scores each image once: decode (CPU, any node) then transfer + backbone + k-NN + maps (the
feature worker's device). With decode as its own stage (decode on every node's free cores, GPU nodes
included), a cluster of G GPU nodes with C cores each and D CPU-only nodes with E cores each runs at

    rate = min(decode, features)
    decode   = (G * (C - reserved) + D * E) * 1000 / decode_ms_per_core      (images/s)
    features = G * gpus_per_node * 1000 / feature_ms                          (images/s)

and with decode in the worker (today's path) at G * min((C - reserved) * 1000 / decode_ms, gpus * 1000 /
feature_ms): a GPU node's own cores are the limit. `reserved` cores per GPU node run the feature worker's
loop. Cost per million images = hourly price of the shape / (rate * 3600) * 1e6 (prices are arguments;
the defaults are placeholders to replace with your own).

Stage costs come from three places:

- `--measure`: measured here, now: decode ms per image per core for bottle PNG (the fast path), magnetic
  tile JPEG and 3000x2000 JPEG (full and draft), and the CPU feature cost of tf_efficientnet_lite0 at
  256x256 (random weights: the timing does not depend on them) plus exact k-NN of its 1,024 patches
  against a `--bank-size` bank (one thread: a feature worker's core);
- `h100`: the H100 figures of benchmarks/README.md (2026-11-27, 16 cores: Pillow PNG decode 247-316
  images/s for 16 processes, feature rates 518 (wide_resnet50_2) / 1,624 (lite0) images/s), with the PNG
  decode sped up by the fast path's measured per-core factor when `--png-speedup` is given;
- `--validate`: on this machine, 1 and 2 decode processes feed one feature worker (one thread) through a
  process pool; the measured images/s is set beside the model's prediction from the stage costs measured
  in the same run (and the cores this machine has).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = os.path.join("..", "shared", "data", "mvtec_ad", "bottle")
DEFAULT_TILES = os.path.join("..", "shared", "data", "magnetic_tile", "magnetic_tile")

# H100 node, benchmarks/README.md "One GPU worker's compute path" (2026-11-27, 16 CPU cores).
H100 = {
    "cores": 16,
    "png_decode_pool_img_s": (247.2, 315.9),  # 16 processes, Pillow decode + resize of 900x900 PNGs
    "feature_img_s": {"wide_resnet50_2": 517.7, "tf_efficientnet_lite0": 1624.0},  # fp32, maps on the GPU
    "jpeg_nvjpeg_img_s": 5677.7,  # the same images as JPEG q95, decoded and resized on the GPU
}


@dataclass(frozen=True)
class Shape:
    gpu_nodes: int
    cores_per_gpu_node: int
    cpu_nodes: int
    cores_per_cpu_node: int
    gpus_per_node: int = 1
    reserved_cores: int = 1  # per GPU node, for the feature worker's own loop


@dataclass(frozen=True)
class Costs:
    decode_ms_per_core: float  # CPU ms to decode + resize one image
    feature_ms_per_gpu: float  # device ms per image: transfer, backbone, k-NN, maps


@dataclass(frozen=True)
class Prices:
    gpu_node_hour: float = 4.00  # placeholder: one GPU node (its GPUs and cores) per hour
    cpu_core_hour: float = 0.04  # placeholder: one CPU-only core per hour


def predict(shape: Shape, costs: Costs, prices: Prices = Prices(), mode: str = "cluster") -> dict[str, Any]:
    """Images/s of `shape`, its bottleneck and cost per million images; mode cluster | worker."""
    free = max(0, shape.cores_per_gpu_node - shape.reserved_cores)
    per_core = 1000.0 / costs.decode_ms_per_core
    gpu_rate = shape.gpus_per_node * 1000.0 / costs.feature_ms_per_gpu  # one GPU node
    if mode == "cluster":
        decode = (shape.gpu_nodes * free + shape.cpu_nodes * shape.cores_per_cpu_node) * per_core
        features = shape.gpu_nodes * gpu_rate
        rate = min(decode, features)
        bottleneck = "decode (CPU cores)" if decode < features else "features (GPUs)"
    elif mode == "worker":
        node = min(free * per_core, gpu_rate)
        decode, features = shape.gpu_nodes * free * per_core, shape.gpu_nodes * gpu_rate
        rate = shape.gpu_nodes * node
        bottleneck = "decode on the GPU nodes' own cores" if free * per_core < gpu_rate else "features (GPUs)"
    else:
        raise ValueError(f"mode must be cluster or worker, not {mode!r}")
    hourly = shape.gpu_nodes * prices.gpu_node_hour + shape.cpu_nodes * shape.cores_per_cpu_node * prices.cpu_core_hour
    return {
        "images_per_s": rate,
        "decode_capacity": decode,
        "feature_capacity": features,
        "bottleneck": bottleneck,
        "gpu_utilisation": rate / features if features else 0.0,
        "usd_per_million": hourly / (rate * 3600) * 1e6 if rate > 0 else math.inf,
        "usd_per_hour": hourly,
    }


def cpu_nodes_for(target: float, shape: Shape, costs: Costs) -> int | None:
    """The fewest CPU-only nodes (of shape's E cores) that bring `shape` to `target` images/s; None: the
    GPUs cannot reach it (add GPU nodes or a cheaper model)."""
    if shape.gpu_nodes * shape.gpus_per_node * 1000.0 / costs.feature_ms_per_gpu < target:
        return None
    for d in range(0, 100_000):
        if (
            predict(
                Shape(
                    shape.gpu_nodes,
                    shape.cores_per_gpu_node,
                    d,
                    shape.cores_per_cpu_node,
                    shape.gpus_per_node,
                    shape.reserved_cores,
                ),
                costs,
            )["images_per_s"]
            >= target
        ):
            return d
    return None


def shape_for(
    target: float,
    costs: Costs,
    cores_per_gpu_node: int,
    cores_per_cpu_node: int,
    gpus_per_node: int = 1,
    prices: Prices = Prices(),
) -> dict[str, Any]:
    """The cheapest (G, D) reaching `target` with G GPU nodes just enough for the features."""
    g = max(1, math.ceil(target * costs.feature_ms_per_gpu / 1000.0 / gpus_per_node))
    base = Shape(g, cores_per_gpu_node, 0, cores_per_cpu_node, gpus_per_node)
    d = cpu_nodes_for(target, base, costs)
    best = Shape(g, cores_per_gpu_node, d or 0, cores_per_cpu_node, gpus_per_node)
    return {"shape": asdict(best), **predict(best, costs, prices)}


# --------------------------------------------------------------------------- measurement on this machine


def _decode_costs(data_dir: str, tiles_dir: str, n: int) -> dict[str, float]:
    from benchmarks_decoders import large_copies, measure  # type: ignore[import-not-found]

    from patchaudit.workers.decode import Preprocess, decode_image

    pngs = sorted(Path(data_dir).glob("test/*/*.png"))
    tiles = sorted(Path(tiles_dir).glob("test/*/*.jpg"))
    fast, draft = Preprocess((256, 256)), Preprocess((256, 256), jpeg_draft=True)
    out = {}
    sets = {"png": [p.read_bytes() for p in pngs[:n]]}
    if tiles:
        sets["jpeg_tile"] = [p.read_bytes() for p in tiles[:n]]
    sets["jpeg_3000x2000"] = large_copies(pngs, 2, "JPEG")
    for name, datas in sets.items():
        out[name] = measure(lambda d: decode_image(d, fast), datas, 2)["cpu_ms"]
    out["jpeg_3000x2000_draft"] = measure(lambda d: decode_image(d, draft), sets["jpeg_3000x2000"], 2)["cpu_ms"]
    return out


class FeatureStage:
    """The CPU feature worker's compute: lite0 backbone (random weights) + exact k-NN on a random bank."""

    def __init__(self, bank_size: int, batch: int = 16) -> None:
        import timm
        import torch

        from patchaudit.workers.features import patchcore_embed
        from patchaudit.workers.knn import TorchShard

        torch.manual_seed(0)
        self.torch, self.embed = torch, patchcore_embed
        self.model = timm.create_model(
            "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3)
        ).eval()
        dim = sum(self.model.feature_info.channels())
        self.shard = TorchShard(np.random.default_rng(0).standard_normal((bank_size, dim)).astype(np.float32))
        self.batch = batch

    def __call__(self, pixels: list[np.ndarray]) -> None:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
            emb = self.embed(self.model(x), 3)  # (B, D, 32, 32)
            q = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
            self.shard.search_tensor(q, 1)


def _feature_ms(stage: FeatureStage, n_batches: int = 3) -> float:
    pix = [np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8) for i in range(stage.batch)]
    stage(pix)  # warm-up
    t = time.perf_counter()
    for _ in range(n_batches):
        stage(pix)
    return (time.perf_counter() - t) * 1e3 / (n_batches * stage.batch)


def _decode_file(path: str) -> np.ndarray:
    from patchaudit.workers.decode import Preprocess, decode_image

    return decode_image(Path(path).read_bytes(), Preprocess((256, 256))).pixels


def validate(data_dir: str, bank_size: int, images: int, procs: list[int]) -> list[dict[str, Any]]:
    """P decode processes feeding one single-threaded feature worker (this process): measured vs predicted."""
    import torch

    torch.set_num_threads(1)
    paths = [str(p) for p in sorted(Path(data_dir).glob("test/*/*.png"))]
    paths = (paths * (images // max(1, len(paths)) + 1))[:images]
    stage = FeatureStage(bank_size)
    rows = []
    for p in procs:
        # stage costs measured now, in the same conditions (wall time: the machine may be shared)
        t = time.perf_counter()
        for path in paths[:8]:
            _decode_file(path)
        decode_ms = (time.perf_counter() - t) * 1e3 / 8
        feature_ms = _feature_ms(stage)
        cores = len(os.sched_getaffinity(0))
        # P decoders at 1000/decode_ms each, one feature worker at 1000/feature_ms, all sharing `cores`
        predicted = min(p * 1000 / decode_ms, 1000 / feature_ms, cores * 1000 / (decode_ms + feature_ms))
        ctx = mp.get_context("spawn")
        with ctx.Pool(p) as pool:
            pool.map(_decode_file, paths[:p])  # start-up outside the timing
            t = time.perf_counter()
            batch: list[np.ndarray] = []
            for pixels in pool.imap(_decode_file, paths, chunksize=1):
                batch.append(pixels)
                if len(batch) == stage.batch:
                    stage(batch)
                    batch = []
            if batch:
                stage(batch)
            measured = len(paths) / (time.perf_counter() - t)
        rows.append(
            {
                "decode_processes": p,
                "feature_workers": 1,
                "cores": cores,
                "decode_ms": decode_ms,
                "feature_ms": feature_ms,
                "predicted_img_s": predicted,
                "measured_img_s": measured,
                "error": measured / predicted - 1,
            }
        )
        print(
            f"validate: {p} decode process(es) + 1 feature worker on {cores} cores: predicted "
            f"{predicted:.1f} img/s, measured {measured:.1f} img/s ({(measured / predicted - 1) * 100:+.0f}%)",
            file=sys.stderr,
        )
    return rows


def h100_report(png_speedup: float, cpu_node_cores: int, target: float) -> dict[str, Any]:
    """One H100 node (16 cores) fed by N CPU-only nodes, from benchmarks/README.md's stage costs."""
    out: dict[str, Any] = {}
    for model, feat_rate in H100["feature_img_s"].items():
        for label, pool in zip(("slow host", "fast host"), H100["png_decode_pool_img_s"]):
            per_core_ms = 1000.0 / (pool / H100["cores"]) / png_speedup
            costs = Costs(per_core_ms, 1000.0 / feat_rate)
            base = Shape(1, H100["cores"], 0, cpu_node_cores)
            n = cpu_nodes_for(target, base, costs)
            rows = {d: predict(Shape(1, H100["cores"], d, cpu_node_cores), costs)["images_per_s"] for d in range(0, 9)}
            out[f"{model}, {label}"] = {
                "png_decode_ms_per_core": per_core_ms,
                "feature_img_s": feat_rate,
                "worker_mode_img_s": predict(base, costs, mode="worker")["images_per_s"],
                "cluster_img_s_by_cpu_nodes": rows,
                f"cpu_nodes_for_{int(target)}": n,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", action="store_true", help="measure decode and CPU feature costs here")
    p.add_argument("--validate", action="store_true", help="measure 1 and 2 decode processes + 1 feature worker")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--tiles", default=DEFAULT_TILES)
    p.add_argument("--images", type=int, default=48, help="images per validation run")
    p.add_argument("--bank-size", type=int, default=20000)
    p.add_argument("--shape", type=int, nargs=4, metavar=("G", "C", "D", "E"), default=(1, 16, 4, 16))
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--decode-ms", type=float, help="decode ms per image per core (default: measured or H100)")
    p.add_argument("--feature-ms", type=float, help="feature ms per image per GPU (default: H100 lite0)")
    p.add_argument("--target", type=float, default=1000.0)
    p.add_argument("--png-speedup", type=float, default=1.0, help="fast PNG decode vs Pillow, per core")
    p.add_argument("--gpu-node-hour", type=float, default=Prices.gpu_node_hour)
    p.add_argument("--cpu-core-hour", type=float, default=Prices.cpu_core_hour)
    p.add_argument("--out")
    args = p.parse_args(argv)
    prices = Prices(args.gpu_node_hour, args.cpu_core_hour)

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "prices_usd": asdict(prices),
    }
    if args.measure:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import importlib

        sys.modules["benchmarks_decoders"] = importlib.import_module("decoders")
        import torch

        torch.set_num_threads(1)
        result["measured_decode_ms_per_core"] = _decode_costs(args.data, args.tiles, 8)
        result["measured_cpu_feature_ms"] = _feature_ms(FeatureStage(args.bank_size))
        print(
            f"measured: decode ms/img/core {result['measured_decode_ms_per_core']}, CPU features "
            f"(lite0 + k-NN, 1 thread) {result['measured_cpu_feature_ms']:.1f} ms/img",
            file=sys.stderr,
        )
    decode_ms = args.decode_ms or 1000.0 / (H100["png_decode_pool_img_s"][0] / H100["cores"]) / args.png_speedup
    feature_ms = args.feature_ms or 1000.0 / H100["feature_img_s"]["tf_efficientnet_lite0"]
    costs = Costs(decode_ms, feature_ms)
    g, c, d, e = args.shape
    shape = Shape(g, c, d, e, args.gpus_per_node)
    result["costs"] = asdict(costs)
    result["shape"] = asdict(shape)
    result["cluster"] = predict(shape, costs, prices)
    result["worker"] = predict(shape, costs, prices, mode="worker")
    result["shape_for_target"] = shape_for(args.target, costs, c, e, args.gpus_per_node, prices)
    result["h100"] = h100_report(args.png_speedup, e, args.target)
    for mode in ("cluster", "worker"):
        r = result[mode]
        print(
            f"{mode}: {g} GPU node(s) x {c} cores + {d} CPU node(s) x {e} cores: {r['images_per_s']:.0f} img/s, "
            f"bottleneck {r['bottleneck']}, ${r['usd_per_million']:.2f} per million images",
            file=sys.stderr,
        )
    t = result["shape_for_target"]
    print(
        f"target {args.target:.0f} img/s: {t['shape']['gpu_nodes']} GPU node(s) + {t['shape']['cpu_nodes']} CPU "
        f"node(s) -> {t['images_per_s']:.0f} img/s, ${t['usd_per_million']:.2f} per million",
        file=sys.stderr,
    )
    for name, r in result["h100"].items():
        print(
            f"H100 {name}: worker mode {r['worker_mode_img_s']:.0f} img/s; CPU nodes of {e} cores for "
            f"{args.target:.0f} img/s: {r[f'cpu_nodes_for_{int(args.target)}']}",
            file=sys.stderr,
        )
    if args.validate:
        result["validation"] = validate(args.data, args.bank_size, args.images, [1, 2])
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
