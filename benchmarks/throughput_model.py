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
- `--validate`: real `patchaudit score` runs with `run.decode: cluster` on this machine: 1 and 2 decode
  actors + one feature worker on a local Ray, then 2 decode actors on one node and the worker on another
  (a 2-node loopback cluster, custom resources). Each measured rate (the worker's images per second of
  its loop) is set beside the prediction of `predict_shared` from stage costs measured just before in
  CPU ms per image (decode; backbone + k-NN + maps), and the cores the run's threads can get here, measured
  by busy probes (1 thread, and decoders + 1 threads): on a shared machine wall-time costs move with the
  load between measurement and run, CPU costs do not.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
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


def predict_shared(decoders: int, decode_ms: float, feature_ms: float, one_thread: float, all_threads: float) -> float:
    """Images/s of `decoders` single-threaded decode processes feeding one single-threaded feature worker on
    the cores they get: stage costs in CPU ms per image; `one_thread` = the cores one busy thread gets (1.0
    on an idle machine), `all_threads` = the cores all decoders + 1 busy threads get together (on an idle
    machine min(threads, cores); on a shared one what the other load leaves, measured by `share_probe`).

    Each stage is limited by its threads, all of them by the cores they share:
    min(decoders * one_thread * 1000 / decode_ms, one_thread * 1000 / feature_ms, all_threads * 1000 / (decode_ms
    + feature_ms)). The per-thread ceiling applies to every thread as long as the machine has that much
    for it (on a machine with fewer cores than threads, the total term binds)."""
    return min(
        decoders * one_thread * 1000.0 / decode_ms,
        one_thread * 1000.0 / feature_ms,
        all_threads * 1000.0 / (decode_ms + feature_ms),
    )


def _spin(seconds: float, out: Any) -> None:
    t, c = time.perf_counter(), time.process_time()
    while time.perf_counter() - t < seconds:
        pass
    out.put((time.process_time() - c) / (time.perf_counter() - t))


def share_probe(threads: int, seconds: float = 3.0) -> float:
    """The cores `threads` busy processes get together on this machine now (CPU s / wall s, summed)."""
    # fork: the children need nothing but this function (call it before Ray or torch start threads)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_spin, args=(seconds, out)) for _ in range(threads)]
    for p in procs:
        p.start()
    shares = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    return float(sum(shares))


def _fit_model(data_dir: str, out: Path, n_train: int, image_size: int) -> str:
    import dataclasses

    from patchaudit.scheduler.config import load_config
    from patchaudit.store.objects import open_store
    from patchaudit.workers.datasets import discover, require_train
    from patchaudit.workers.fit import fit_model

    config = load_config(str(REPO / "configs" / "default.yaml")).model
    config = dataclasses.replace(
        config,
        image_size=(image_size, image_size),
        calibration=dataclasses.replace(config.calibration, folds=2),
    ).validate()
    store = open_store(data_dir)
    keys = sorted(require_train(discover(store)))[:n_train]
    model, _ = fit_model(config, store, keys)
    model.save(str(out))
    return open_store(str(out)).uri


def _stage_costs(model_uri: str, input_uri: str, keys: list[str], chunk: int = 16) -> dict[str, float]:
    """CPU ms per image of the two stages as the cluster path runs them, each on one thread, here:
    decode (workers.decode_stage.decode_batch) and features (workers.pipeline.score_batches with the
    worker's options: embeddings on, no heatmaps; the k-NN in this process instead of an index actor)."""
    import faiss
    import torch

    from patchaudit.store.objects import open_store
    from patchaudit.workers.decode_stage import decode_batch, unpack
    from patchaudit.workers.model import load_model
    from patchaudit.workers.pipeline import score_batches

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    model = load_model(model_uri)
    read = open_store(input_uri).read_bytes
    sample = keys[: 2 * chunk]
    decode_batch(read, sample[:4], model.preprocess)  # warm-up
    c = time.process_time()
    batches = [unpack(decode_batch(read, sample[i : i + chunk], model.preprocess)) for i in (0, chunk)]
    decode_ms = (time.process_time() - c) * 1e3 / len(sample)
    list(score_batches(model, batches[:1], model.index, embeddings=True))  # warm-up
    c = time.process_time()
    list(score_batches(model, batches, model.index, embeddings=True))
    feature_ms = (time.process_time() - c) * 1e3 / len(sample)
    return {"decode_cpu_ms": decode_ms, "feature_cpu_ms": feature_ms}


def _link_inputs(data_dir: str, root: Path, n: int) -> str:
    """`n` bottle test PNGs under `root` (the 83 test images, linked again under new names past 83)."""
    files = sorted(Path(data_dir).glob("test/*/*.png"))
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dst = root / f"{i:05d}_{files[i % len(files)].parent.name}.png"
        if not dst.exists():
            try:
                os.link(files[i % len(files)], dst)
            except OSError:
                dst.write_bytes(files[i % len(files)].read_bytes())
    from patchaudit.store.objects import open_store

    return open_store(str(root)).uri


def _cluster_run(
    model_uri: str, input_uri: str, report: Path, decoders: int, two_node: bool, batch_size: int
) -> dict[str, Any]:
    """One `patchaudit score` run with `decoders` decode actors and one feature worker on a fresh local Ray
    (one node, or two on loopback: the decode actors on the head, the worker on the other); its summary."""
    import dataclasses

    import ray
    import redis

    from patchaudit.queue.streams import BatchQueue
    from patchaudit.scheduler.config import load_config
    from patchaudit.scheduler.run import new_run_id, run_score

    run = {"batch_size": batch_size, "feature_workers": 1, "heatmaps": False, "decode": "cluster"}
    run |= {"decode_actors": decoders, "decode_threads": 1, "redis_url": "redis://127.0.0.1:6379"}
    cluster = None
    if two_node:
        from ray.cluster_utils import Cluster

        node = {"node_ip_address": "127.0.0.1", "object_store_memory": 256 << 20}
        cluster = Cluster(
            initialize_head=True,
            connect=True,
            head_node_args={
                **node,
                "num_cpus": decoders,
                "resources": {"decode": decoders},
                "include_dashboard": False,
            },
        )
        cluster.add_node(**node, num_cpus=1, resources={"features": 1})
        cluster.wait_for_nodes()
        run |= {"decode_resource": "decode", "worker_resource": "features"}
    else:
        ray.init(
            address="local",
            num_cpus=decoders + 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
    config = load_config(None)
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, **run).validate())
    run_id = new_run_id()
    try:
        return run_score(config, input_uri, model_uri, str(report), run_id=run_id, progress=False)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        BatchQueue(redis.Redis.from_url(run["redis_url"]), run_id).delete()


def validate_cluster(
    data_dir: str, out: Path, images: int, decoders: list[int], two_node: bool, batch_size: int
) -> list[dict[str, Any]]:
    """Measured vs predicted images/s of the real cluster-decode path (`run.decode: cluster`) on this machine."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    model_uri = _fit_model(data_dir, out / "model", n_train=16, image_size=128)
    input_uri = _link_inputs(data_dir, out / "input", images)
    keys = sorted(p.name for p in (out / "input").iterdir())
    rows = []
    shapes = [(p, False) for p in decoders] + ([(max(decoders), True)] if two_node else [])
    for n, (p, two) in enumerate(shapes):
        costs = _stage_costs(model_uri, input_uri, keys)
        one, every = share_probe(1), share_probe(p + 1)
        load0, cpu0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
        shutil.rmtree(out / f"report{n}", ignore_errors=True)  # a fresh run each time (the folder is scratch)
        summary = _cluster_run(model_uri, input_uri, out / f"report{n}", p, two, batch_size)
        wall = time.perf_counter() - t0
        [worker] = summary["workers"]
        measured = worker["images"] / worker["seconds"]
        predicted = predict_shared(p, costs["decode_cpu_ms"], costs["feature_cpu_ms"], one, every)
        row = {
            "decode_actors": p,
            "feature_workers": 1,
            "nodes": 2 if two else 1,
            **costs,
            "cores_one_thread": one,
            "cores_all_threads": every,
            "predicted_img_s": predicted,
            "measured_img_s": measured,
            "error": measured / predicted - 1,
            "worker_seconds": worker["seconds"],
            "worker_cpu_s": worker.get("cpu_s"),
            "worker_cpu_ms_per_image": 1e3 * worker.get("cpu_s", 0.0) / max(1, worker["images"]),
            "decoder_cpu_s": [d.get("cpu_s") for d in summary.get("decoders", [])],
            "decode_wait_s": worker["decode"]["wait_s"],
            "run_wall_s": wall,
            "driver_cpu_s": time.process_time() - cpu0,
            "load_avg_1min": [load0, os.getloadavg()[0]],
        }
        rows.append(row)
        print(
            f"validate: {p} decode actor(s) + 1 feature worker, {row['nodes']} node(s): stage CPU ms/img decode "
            f"{costs['decode_cpu_ms']:.1f}, features {costs['feature_cpu_ms']:.1f}; cores got: 1 thread "
            f"{one:.2f}, {p + 1} threads {every:.2f}; predicted {predicted:.2f} img/s, measured {measured:.2f} "
            f"({row['error'] * 100:+.0f}%); worker CPU {row['worker_cpu_ms_per_image']:.1f} ms/img, load {load0:.0f}",
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
    p.add_argument(
        "--validate",
        action="store_true",
        help="measure runs with 1 and 2 decode actors + 1 feature worker (run.decode: cluster), one node and two",
    )
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--tiles", default=DEFAULT_TILES)
    p.add_argument("--images", type=int, default=96, help="images per validation run")
    p.add_argument("--batch-size", type=int, default=48, help="images per queue message in the validation runs")
    p.add_argument("--one-node", action="store_true", help="validate without the 2-node loopback cluster")
    p.add_argument("--workdir", default=os.path.join("runs", "bench", "throughput"), help="model, inputs, reports")
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
        out = Path(args.workdir)
        result["validation"] = validate_cluster(
            args.data, out, args.images, [1, 2], two_node=not args.one_node, batch_size=args.batch_size
        )
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
