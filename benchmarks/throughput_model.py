"""Throughput model: per-stage costs -> images/s, bottleneck and cost per million images for a cluster shape.

    python benchmarks/throughput_model.py [--measure] [--validate] [--shape G C D E] [--target 1000]
                                          [--format png|jpeg] [--out results.json]

A run scores each image once: decode (CPU, any node), the hand-over of its pixels through Ray's object
store, then backbone + k-NN + maps (the feature worker's device) and the worker's loop around the model
(claim, rows, embeddings, the Parquet part, ack; the k-NN round trip to the index actor), all CPU on the
GPU node. With decode as its own stage (on every node's free cores, GPU nodes included), a cluster of G
GPU nodes with C cores each and D CPU-only nodes with E cores each, Ray taking `bg` cores of each node:

    rate     = min(decode, features)
    decode   = min((G * (C - reserved - bg) + D * (E - bg)) * 1000 / (decode_ms + out_ms + loop_ms + in_ms),
                   G * (C - reserved - bg) * 1000 / (loop_ms + in_ms))                 (images/s)
    features = G * gpus_per_node * 1000 / feature_ms                                   (images/s)

out_ms / in_ms: the hand-over's CPU on the decoder's node / the worker's node. With decode in the worker
the rate is G * min((C - reserved - bg) * 1000 / (decode_ms + loop_ms), gpus * 1000 / feature_ms): a GPU
node's own cores are the limit. `reserved` cores per GPU node drive the GPU. Cost per million images =
hourly price of the shape / (rate * 3600) * 1e6 (prices are arguments; the defaults are placeholders).

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
  its loop) is set beside the prediction of `predict_shared` from costs measured on their own before the
  runs, in CPU ms per image: decode; backbone + k-NN + maps; the loop (a zero-cost `patchaudit score`
  run, the commit of real results, the k-NN round trip); the object-store hand-over; Ray's idle CPU
  (benchmarks/run_costs.py); and the cores the run's threads can get here, measured by busy probes
  (1 thread, and decoders + 1 threads) just before and just after the run. On a shared machine
  wall-time costs move with the load between measurement and run, CPU costs do not. During the run the
  CPU of each process by role is recorded, to set the model's CPU per image beside the run's.
"""

from __future__ import annotations

import argparse
import dataclasses
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
sys.path.insert(1, str(Path(__file__).resolve().parent))  # run_costs, orchestration
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
    loop_ms: float = 0.0  # CPU ms per image on the worker's node: claim, rows, part, ack, k-NN round trip
    transfer_out_ms: float = 0.0  # CPU ms per image on the decoder's node: a decoded image into the object store
    transfer_in_ms: float = 0.0  # CPU ms per image on the worker's node: taking it from there (cluster decode only)
    background_cores: float = 0.0  # Ray's own CPU per node while a run is up (raylet, agents; GCS, driver)


@dataclass(frozen=True)
class Prices:
    gpu_node_hour: float = 4.00  # placeholder: one GPU node (its GPUs and cores) per hour
    cpu_core_hour: float = 0.04  # placeholder: one CPU-only core per hour


def predict(shape: Shape, costs: Costs, prices: Prices = Prices(), mode: str = "cluster") -> dict[str, Any]:
    """Images/s of `shape`, its bottleneck and cost per million images; mode cluster | worker.

    A GPU node's cores, less `reserved_cores` (the thread driving the GPU) and Ray's background, run the
    worker's loop (and in cluster mode the hand-over from the object store) for every image its GPUs
    score, and decode with what is left; a CPU node's cores, less the background, decode and hand over.
    Cluster: rate <= features, rate * (loop + in) <= the GPU nodes' cores, rate * (decode + out + loop
    + in) <= all cores. Worker: per GPU node, rate * (decode + loop) <= its cores."""
    c = costs
    free = max(0.0, shape.cores_per_gpu_node - shape.reserved_cores - c.background_cores)  # per GPU node
    cpu_node = max(0.0, shape.cores_per_cpu_node - c.background_cores)
    gpu_rate = shape.gpus_per_node * 1000.0 / c.feature_ms_per_gpu  # one GPU node
    if mode == "cluster":
        gpu_side = c.loop_ms + c.transfer_in_ms
        total = shape.gpu_nodes * free + shape.cpu_nodes * cpu_node
        decode = total * 1000.0 / (c.decode_ms_per_core + c.transfer_out_ms + gpu_side)
        if gpu_side > 0:
            decode = min(decode, shape.gpu_nodes * free * 1000.0 / gpu_side)
        features = shape.gpu_nodes * gpu_rate
        rate = min(decode, features)
        bottleneck = "decode (CPU cores)" if decode < features else "features (GPUs)"
    elif mode == "worker":
        per_node = free * 1000.0 / (c.decode_ms_per_core + c.loop_ms)
        node = min(per_node, gpu_rate)
        decode, features = shape.gpu_nodes * per_node, shape.gpu_nodes * gpu_rate
        rate = shape.gpu_nodes * node
        bottleneck = "decode on the GPU nodes' own cores" if per_node < gpu_rate else "features (GPUs)"
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
    unlimited = Shape(shape.gpu_nodes, shape.cores_per_gpu_node, 10**9, shape.cores_per_cpu_node, shape.gpus_per_node)
    if predict(dataclasses.replace(unlimited, reserved_cores=shape.reserved_cores), costs)["images_per_s"] < target:
        return None  # the GPU nodes' own cores cannot run the loop for that many images
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


def predict_shared(
    decoders: int,
    decode_ms: float,
    worker_ms: float,
    one_thread: float,
    all_threads: float,
    background_cores: float = 0.0,
    in_flight: int = 2,
) -> float:
    """Images/s of `decoders` single-threaded decode actors feeding one feature worker on the cores they get.

    decode_ms: a decode actor's CPU ms per image (decode + its side of the object-store hand-over);
    worker_ms: the worker's (features + its loop + its side of the hand-over), all on its compute path.
    `one_thread` = the cores one busy thread gets (1.0 on an idle machine), `all_threads` = the cores
    decoders + 1 busy threads get together (on an idle machine min(threads, cores); on a shared one what
    the other load leaves, measured by `share_probe`); Ray's daemons and the driver take `background_cores`.

    Three limits: the decoders (decoders * one_thread * 1000 / decode_ms), all threads on the cores they
    share ((all_threads - background) * 1000 / (decode_ms + worker_ms)), and the worker's own thread. The
    worker takes a message's decoded batches together and that frees `in_flight` requests at once, so
    k = min(decoders, in_flight) decode actors decode the next message while the worker scores this one:
    while they run, each of the k + 1 busy threads gets s = min(one_thread, all_threads / (k + 1)) of a
    core, the worker `one_thread` otherwise. The decoders are busy u of the time, rate * decode_ms / 1000
    = k * u * s, and the worker's CPU rate * worker_ms / 1000 = u * s + (1 - u) * one_thread, so
    rate = 1000 * one_thread / (worker_ms + decode_ms * (one_thread - s) / (k * s)); with a core for
    every thread (s = one_thread) that is one_thread * 1000 / worker_ms."""
    k = max(1, min(decoders, in_flight))
    s = min(one_thread, all_threads / (k + 1))
    worker = 1000.0 * one_thread / (worker_ms + decode_ms * (one_thread - s) / (k * s))
    return min(
        decoders * one_thread * 1000.0 / decode_ms,
        worker,
        max(0.0, all_threads - background_cores) * 1000.0 / (decode_ms + worker_ms),
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


def _stage_costs(model_uri: str, input_uri: str, keys: list[str], scratch: Path, chunk: int = 16) -> dict[str, Any]:
    """CPU ms per image of the stages as the cluster path runs them, each on one thread, here: decode
    (workers.decode_stage.decode_batch), features (workers.pipeline.score_batches with the worker's
    options: embeddings on, no heatmaps; the k-NN in this process instead of an index actor) and the
    commit of their results as the worker writes it (rows, embeddings, the Parquet part, into `scratch`);
    with the pixels' (h, w, 3) and the k-NN queries' (patches, dim) per image."""
    import faiss
    import torch

    from patchaudit.store import reports
    from patchaudit.store.embeddings import write_embeddings
    from patchaudit.store.objects import ObjectInfo, open_store
    from patchaudit.workers.decode_stage import decode_batch, unpack
    from patchaudit.workers.model import load_model
    from patchaudit.workers.pipeline import score_batches
    from patchaudit.workers.rows import build_embeddings, build_rows

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
    results = list(score_batches(model, batches, model.index, embeddings=True))
    feature_ms = (time.process_time() - c) * 1e3 / len(sample)
    shutil.rmtree(scratch, ignore_errors=True)
    store = open_store(str(scratch))
    infos = {k: ObjectInfo(k, 1, "0", f"file:///{k}") for k in sample}

    def commit(batch_id: str) -> None:
        rows = build_rows(results, infos, "r", model, 1, "w")
        write_embeddings(store, batch_id, build_embeddings(results, infos, model))
        reports.write_part(store, batch_id, rows)

    commit("b000000")  # warm-up
    c = time.process_time()
    for i in range(1, 4):
        commit(f"b{i:06d}")
    commit_ms = (time.process_time() - c) * 1e3 / (3 * len(sample))
    pixels = batches[0][0].image.pixels.shape  # type: ignore[union-attr]
    with torch.inference_mode():
        x = torch.zeros((1, 3, *pixels[:2]))
        emb = model.embed(x) if model.needs_index else None  # (1, D, h, w): what is sent to the index actor
    return {
        "decode_cpu_ms": decode_ms,
        "feature_cpu_ms": feature_ms,
        "commit_cpu_ms": commit_ms,
        "pixels": tuple(pixels),
        "queries": (int(emb.shape[2] * emb.shape[3]), int(emb.shape[1])) if emb is not None else None,
    }


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
    (one node, or two on loopback: the decode actors on the head, the worker and the index shard on the
    other); its summary."""
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
        # the index shard beside the worker (as in handoff_costs): its k-NN round trips stay on the node
        cluster.add_node(**node, num_cpus=1, resources={"features": 1, "index": 1})
        cluster.wait_for_nodes()
        run |= {"decode_resource": "decode", "worker_resource": "features", "index_resource": "index"}
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
    data_dir: str, out: Path, images: int, decoders: list[int], two_node: bool, batch_size: int, loop_files: int = 3200
) -> dict[str, Any]:
    """Measured vs predicted images/s of the real cluster-decode path (`run.decode: cluster`) on this machine.

    Before the runs, each measured on its own (benchmarks/run_costs.py): the worker's loop with no model
    work, the object-store hand-over and the k-NN round trip at this model's sizes on one node and on two,
    and Ray's idle CPU. Before each run: the stage costs (decode, features, the commit of real results)
    and the cores busy threads get now. During each run, the CPU of every process by role over its
    steady window (first to last report part), to see where a miss comes from."""
    import pyarrow.parquet as pq
    from run_costs import RoleCpu, cpu_between, handoff_costs, zero_cost_loop_ms  # type: ignore[import-not-found]

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    model_uri = _fit_model(data_dir, out / "model", n_train=16, image_size=128)
    input_uri = _link_inputs(data_dir, out / "input", images)
    keys = sorted(p.name for p in (out / "input").iterdir())
    sizes = _stage_costs(model_uri, input_uri, keys, out / "commit")
    feature_batch = _feature_batch(model_uri)
    loop0 = zero_cost_loop_ms(model_uri, out, loop_files, batch_size)
    handoff = {two: handoff_costs(feature_batch, sizes["pixels"], sizes["queries"], two) for two in {False, two_node}}
    print(f"validate: zero-cost loop {loop0:.2f} CPU ms/img; hand-over {handoff}", file=sys.stderr)
    rows = []
    shapes = [(p, False) for p in decoders] + ([(max(decoders), True)] if two_node else [])
    for n, (p, two) in enumerate(shapes):
        costs = _stage_costs(model_uri, input_uri, keys, out / "commit")
        h = handoff[two]
        loop = loop0 + costs["commit_cpu_ms"] + h["knn_round_trip_ms"]
        decode_side = costs["decode_cpu_ms"] + h["transfer_out_ms"]
        worker_side = costs["feature_cpu_ms"] + loop + h["transfer_in_ms"]
        before = share_probe(1), share_probe(p + 1)
        report = out / f"report{n}"
        load0, cpu0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
        shutil.rmtree(report, ignore_errors=True)  # a fresh run each time (the folder is scratch)
        sampler = RoleCpu().start()
        summary = _cluster_run(model_uri, input_uri, report, p, two, batch_size)
        sampler.stop()
        wall = time.perf_counter() - t0
        after = share_probe(1), share_probe(p + 1)
        # the neighbours' load moves within a run: the cores got, probed just before and just after, averaged
        one, every = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        predicted = predict_shared(p, decode_side, worker_side, one, every, h["background_cores"])
        stages_only = min(  # the model before the loop, hand-over, background and shared-core terms
            p * one * 1000.0 / costs["decode_cpu_ms"],
            one * 1000.0 / costs["feature_cpu_ms"],
            every * 1000.0 / (costs["decode_cpu_ms"] + costs["feature_cpu_ms"]),
        )
        [worker] = summary["workers"]
        measured = worker["images"] / worker["seconds"]
        parts = sorted((f.stat().st_mtime, pq.read_metadata(f).num_rows) for f in (report / "parts").glob("*.parquet"))
        later, span = sum(k for _, k in parts[1:]), parts[-1][0] - parts[0][0]
        steady = cpu_between(sampler.series, parts[0][0], parts[-1][0])
        row = {
            "decode_actors": p,
            "feature_workers": 1,
            "nodes": 2 if two else 1,
            **{k: v for k, v in costs.items() if k not in ("pixels", "queries")},
            "loop_cpu_ms": loop,
            "loop_parts_ms": {
                "zero_cost_loop": loop0,
                "commit": costs["commit_cpu_ms"],
                "knn_round_trip": h["knn_round_trip_ms"],
            },
            "transfer_out_ms": h["transfer_out_ms"],
            "transfer_in_ms": h["transfer_in_ms"],
            "background_cores": h["background_cores"],
            "decoder_cpu_ms": decode_side,
            "worker_cpu_ms": worker_side,
            "cores_one_thread": one,
            "cores_all_threads": every,
            "cores_probed_before_after": [before, after],
            "predicted_img_s": predicted,
            "predicted_stages_only_img_s": stages_only,
            "measured_img_s": measured,
            "error": measured / predicted - 1,
            "worker_seconds": worker["seconds"],
            "worker_cpu_s": worker.get("cpu_s"),
            "worker_cpu_ms_per_image": 1e3 * worker.get("cpu_s", 0.0) / max(1, worker["images"]),
            "decoder_cpu_s": [d.get("cpu_s") for d in summary.get("decoders", [])],
            "decode_wait_s": worker["decode"]["wait_s"],
            # where the worker's loop time went: its features (wall) and k-NN round trips, from the report rows
            "worker_features_wall_s": _column_sum(report, "feature_ms") / 1e3,
            "worker_knn_wall_s": _column_sum(report, "knn_ms") / 1e3,
            "steady_img_s": later / span if span > 0 else None,
            "steady_cpu_ms_per_image": {k: 1e3 * v / later for k, v in sorted(steady.items())} if later else {},
            "steady_cores": sum(steady.values()) / span if span > 0 else None,
            # the model's CPU per image (decoders + worker + Ray's background at the steady rate) against the run's
            "predicted_cpu_ms_per_image": decode_side
            + worker_side
            + h["background_cores"] * span * 1e3 / max(1, later),
            "steady_total_cpu_ms_per_image": 1e3 * sum(steady.values()) / later if later else None,
            "run_wall_s": wall,
            "driver_cpu_s": time.process_time() - cpu0,
            "load_avg_1min": [load0, os.getloadavg()[0]],
        }
        rows.append(row)
        print(
            f"validate: {p} decode actor(s) + 1 feature worker, {row['nodes']} node(s): CPU ms/img decoder "
            f"{decode_side:.1f} (decode {costs['decode_cpu_ms']:.1f}), worker {worker_side:.1f} (features "
            f"{costs['feature_cpu_ms']:.1f}, loop {loop:.1f}, hand-over {h['transfer_in_ms']:.2f}); cores got: 1 "
            f"thread {one:.2f}, {p + 1} threads {every:.2f}; predicted {predicted:.1f} img/s (stages only "
            f"{stages_only:.1f}), measured {measured:.1f} ({row['error'] * 100:+.0f}%); worker CPU "
            f"{row['worker_cpu_ms_per_image']:.1f} ms/img; run's CPU {row['steady_total_cpu_ms_per_image'] or 0:.1f} ms/img "
            f"(model {row['predicted_cpu_ms_per_image']:.1f}) on {row['steady_cores'] or 0:.2f} cores; load {load0:.1f}",
            file=sys.stderr,
        )
    return {"zero_cost_loop_ms": loop0, "handoff": {str(k): v for k, v in handoff.items()}, "runs": rows}


def _column_sum(report: Path, column: str) -> float:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return float(
        pc.sum(pq.read_table(sorted((report / "parts").glob("*.parquet")), columns=[column])[column]).as_py() or 0
    )


def _feature_batch(model_uri: str) -> int:
    """Images per forward pass of the model (a feature worker asks the decode actors for batches of it)."""
    from patchaudit.store.artifacts import read_manifest
    from patchaudit.store.objects import open_store

    manifest = read_manifest(open_store(model_uri))
    return int(manifest.get("config", {}).get("batch_size", 16))


# The CPU a run spends per image besides decode and the model, measured here by `--validate` (2026-12-03,
# AMD EPYC, 2 cores; benchmarks/README.md) and carried to the H100 figures' input, lite0 at 256x256: four
# times the pixels and the k-NN queries of the validation's 128x128 model, so the hand-over and the k-NN
# round trip are scaled by 4 (CPU per byte), the rest of the loop (claim, rows, part, ack) is per image.
# Cross-node hand-over (the two-node figures): a CPU node's images reach the GPU node through the network.
# Measured (128x128): loop with no model work 0.22, commit of real rows 0.16, k-NN round trip 0.40 (same
# node) -> 0.22 + 0.16 + 4 x 0.40 = 2.0; hand-over between two nodes 0.24 out / 0.32 in -> x 4; Ray idle
# on one node (raylet, GCS, agents, driver) 0.06 cores.
OVERHEADS_256 = {"loop_ms": 2.0, "transfer_out_ms": 0.95, "transfer_in_ms": 1.29, "background_cores": 0.06}


def h100_report(
    png_speedup: float, cpu_node_cores: int, target: float, overheads: dict[str, float] | None = None
) -> dict[str, Any]:
    """One H100 node (16 cores) fed by N CPU-only nodes, from benchmarks/README.md's stage costs and the
    loop / hand-over / background CPU in `overheads` (default OVERHEADS_256)."""
    extra = OVERHEADS_256 if overheads is None else overheads
    out: dict[str, Any] = {}
    for model, feat_rate in H100["feature_img_s"].items():
        for label, pool in zip(("slow host", "fast host"), H100["png_decode_pool_img_s"]):
            per_core_ms = 1000.0 / (pool / H100["cores"]) / png_speedup
            costs = Costs(per_core_ms, 1000.0 / feat_rate, **extra)
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
    p.add_argument(
        "--images", type=int, default=960, help="images per validation run (a short run is mostly pipeline fill)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per queue message in the validation runs")
    p.add_argument("--one-node", action="store_true", help="validate without the 2-node loopback cluster")
    p.add_argument("--workdir", default=os.path.join("runs", "bench", "throughput"), help="model, inputs, reports")
    p.add_argument("--bank-size", type=int, default=20000)
    p.add_argument("--shape", type=int, nargs=4, metavar=("G", "C", "D", "E"), default=(1, 16, 4, 16))
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--decode-ms", type=float, help="decode ms per image per core (default: measured or H100)")
    p.add_argument("--feature-ms", type=float, help="feature ms per image per GPU (default: H100 lite0)")
    p.add_argument("--target", type=float, default=1000.0)
    for name, help_ in (
        ("loop_ms", "CPU ms per image of the worker's loop on the GPU node"),
        ("transfer_out_ms", "CPU ms per image on the decoder's node for the object-store hand-over"),
        ("transfer_in_ms", "CPU ms per image on the worker's node for the hand-over"),
        ("background_cores", "Ray's own CPU per node, in cores"),
    ):
        flag = "--" + name.replace("_", "-")
        p.add_argument(
            flag, type=float, default=OVERHEADS_256[name], help=f"{help_} (default: measured, see OVERHEADS_256)"
        )
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
    overheads = {k: getattr(args, k) for k in OVERHEADS_256}
    costs = Costs(decode_ms, feature_ms, **overheads)
    g, c, d, e = args.shape
    shape = Shape(g, c, d, e, args.gpus_per_node)
    result["costs"] = asdict(costs)
    result["shape"] = asdict(shape)
    result["cluster"] = predict(shape, costs, prices)
    result["worker"] = predict(shape, costs, prices, mode="worker")
    result["shape_for_target"] = shape_for(args.target, costs, c, e, args.gpus_per_node, prices)
    result["h100"] = h100_report(args.png_speedup, e, args.target, overheads)
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
