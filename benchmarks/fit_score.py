"""Fit and score one category on this machine: stage timings, throughput, peak memory, accuracy.

    python benchmarks/fit_score.py [--data DIR] [--config YAML] [--index flat|hnsw|ivf]
                                   [--coreset RATIO] [--backbone NAME] [--out results.json]

Fit and score run in two child processes of this script, so each phase's peak RSS (ru_maxrss) is its
own: fit = backbone + train features + coreset + index + calibration; score = model load + warm-up +
the end-to-end pass. The score child then re-runs the test split stage by stage (decode on one thread,
features, k-NN, maps) and keeps the maps for the metrics; its peak after that is reported separately
("with evaluation"). For approximate indexes, a flat index over the same bank vectors gives the exact
neighbours: recall@1 and the accuracy the exact search would have had.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join("..", "shared", "data", "mvtec_ad", "bottle")
DEFAULT_CONFIG = os.path.join("configs", "default.yaml")


# --------------------------------------------------------------------------- small pure helpers


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class Stopwatch:
    """Wall and process CPU time (all threads) per stage: `with clock("features", n=len(batch)): ...`.

    Per stage: mean wall and CPU ms per item, and the best call's wall ms per item. On a shared
    machine the mean includes waiting for a core and CPU time includes idle OpenMP threads spinning;
    the best call is the closest to what the stage costs on a quiet machine.
    """

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self._next = ("", 1)

    def __call__(self, stage: str, n: int = 1) -> Stopwatch:
        self._next = (stage, n)
        return self

    def __enter__(self) -> Stopwatch:
        self._t = (time.perf_counter(), time.process_time(), *self._next)
        return self

    def __exit__(self, *exc: object) -> None:
        w0, c0, stage, n = self._t
        wall = time.perf_counter() - w0
        self.wall[stage] = self.wall.get(stage, 0.0) + wall
        self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - c0
        self.best[stage] = min(self.best.get(stage, float("inf")), wall / n)

    def per_item(self, n: int) -> dict[str, dict[str, float]]:
        """{stage: {"wall": mean ms, "cpu": mean ms, "best": best call's wall ms}} per item, n items in all."""
        return {
            k: {"wall": 1e3 * self.wall[k] / n, "cpu": 1e3 * self.cpu[k] / n, "best": 1e3 * self.best[k]}
            for k in self.wall
        }


def apply_overrides(
    config,
    coreset: float | None = None,
    index: str | None = None,
    backbone: str | None = None,
    ef_search: int | None = None,
    nprobe: int | None = None,
    decode_threads: int | None = None,
    knn_backend: str | None = None,
):
    """A copy of `config` (scheduler.config.Config) with the command-line overrides, validated again."""
    from patchaudit.scheduler.config import Config

    pc = config.model.patchcore
    pc_changes = {
        k: v
        for k, v in (
            ("coreset_ratio", coreset),
            ("index", index),
            ("hnsw_ef_search", ef_search),
            ("ivf_nprobe", nprobe),
        )
        if v is not None
    }
    model = dataclasses.replace(config.model, patchcore=dataclasses.replace(pc, **pc_changes))
    if backbone is not None:
        model = dataclasses.replace(model, backbone=backbone)
    run_changes = {k: v for k, v in (("decode_threads", decode_threads), ("knn_backend", knn_backend)) if v is not None}
    run = dataclasses.replace(config.run, **run_changes)
    return Config(model=model.validate(), run=run.validate())


def true_sq_dists(queries, bank, ids):
    """Squared L2 from each query (M, D) to bank[ids] (M,), in float64 and computed directly.

    faiss's flat search expands ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2 (BLAS); with feature norms^2
    in the thousands that leaves absolute errors ~1e-2, too coarse to tell ties from misses.
    """
    import numpy as np

    diff = np.asarray(queries, dtype=np.float64) - np.asarray(bank, dtype=np.float64)[np.asarray(ids)]
    return np.einsum("md,md->m", diff, diff)


def recall_stats(approx_ids, exact_ids, approx_d, exact_d) -> dict[str, Any]:
    """1-NN recall of an approximate search against the exact one; ids (M,), true squared dists (M,).

    same_id: the exact neighbour was returned. same_distance: a neighbour at the exact distance was
    returned (another id can tie: duplicate bank vectors), which is what the scores see. For the
    misses, distance ratios (approximate / exact, not squared) say how wrong they are.
    """
    import numpy as np

    a_i, e_i = np.asarray(approx_ids).reshape(-1), np.asarray(exact_ids).reshape(-1)
    a_d, e_d = np.asarray(approx_d, np.float64).reshape(-1), np.asarray(exact_d, np.float64).reshape(-1)
    miss = a_d > e_d * (1 + 1e-9) + 1e-12
    ratio = np.sqrt(a_d[miss] / np.maximum(e_d[miss], 1e-30))
    return {
        "same_id": int(np.count_nonzero(a_i == e_i)),
        "same_distance": int(a_i.size - miss.sum()),
        "queries": int(a_i.size),
        "miss_ratios": ratio,
    }


def accuracy_summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "threshold",
        "precision",
        "recall",
        "f1",
        "tp",
        "fp",
        "fn",
        "tn",
        "n_images",
        "n_good",
        "n_anomalous",
        "pixel_images",
        "pixel_excluded",
        "pixel_missing_mask",
        "pixel_auroc_within_defective",
        "pixel_auroc_vs_good",
        "per_defect",
    )
    return {k: result[k] for k in keys if k in result}


def metric_deltas(approx: dict[str, Any], exact: dict[str, Any]) -> dict[str, float | None]:
    out = {}
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        a, e = approx.get(k), exact.get(k)
        out[k] = None if a is None or e is None else a - e
    return out


# --------------------------------------------------------------------------- fit phase (child process)


def run_fit(config, data: str, model_dir: str) -> dict[str, Any]:
    import torch

    from patchaudit.store.objects import open_store
    from patchaudit.workers.datasets import discover, require_train
    from patchaudit.workers.fit import fit_model
    from patchaudit.workers.model import backbone_for, resolve_device

    load0 = load_avg()
    store = open_store(data)
    keys = require_train(discover(store))
    # Warm-up: the first forward pays for kernel selection and thread-pool start; fit_model loads
    # its own backbone afterwards (that load is timed as backbone_load_s).
    bb = backbone_for(config.model, resolve_device(config.model.device))
    h, w = config.model.center_crop or config.model.image_size
    with torch.inference_mode():
        for _ in range(2):
            bb.extract(torch.zeros(config.model.batch_size, 3, h, w, device=bb.device))
    del bb
    t0, c0 = time.perf_counter(), time.process_time()
    model, info = fit_model(config.model, store, keys, progress=None, threads=config.run.decode_threads)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.save(model_dir)
    return {
        "n_train_images": len(keys),
        "n_fit_images": info["n_fit_images"],
        "n_calibration_images": info["n_calibration_images"],
        "backbone_load_s": info["backbone_load_s"],
        "features_s": info.get("features_s"),  # decode (thread pool) + backbone + patch embedding
        "coreset_s": info.get("coreset_s"),
        "index_s": info.get("index_s"),
        "calibration_s": info["calibration_s"],
        "total_s": wall,
        "total_cpu_s": cpu,  # process CPU time, all threads
        "patches": info.get("patches"),
        "bank_size": getattr(model, "bank_size", None),
        "feature_dim": getattr(model, "feature_dim", None),
        "threshold": model.threshold,
        "n_errors": len(info["errors"]),
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": load0,
        "load_avg_end": load_avg(),
    }


# --------------------------------------------------------------------------- score phase (child process)


def _sum_stages(stages: dict[str, dict[str, float]], names: tuple[str, ...]) -> dict[str, float]:
    return {kind: sum(stages[k][kind] for k in names) for kind in ("wall", "cpu", "best")}


def _exact_twin(index):
    """A flat (exact) ShardedIndex over the very vectors of `index`, with the same global ids."""
    from patchaudit.workers.knn import FaissShard, IndexSpec, ShardedIndex

    shards = []
    for s in index.shards:
        vecs = s.vectors()
        shards.append(FaissShard.build(vecs, s.offset, IndexSpec("flat")))
    return ShardedIndex(shards)


def _index_params(index) -> dict[str, Any]:
    s = index.shards[0]
    ix = getattr(s, "index", None)
    out: dict[str, Any] = {
        "type": type(ix).__name__ if ix is not None else type(s).__name__,
        "shards": len(index.shards),
        "ntotal": index.ntotal,
    }
    if ix is not None and hasattr(ix, "hnsw"):
        out["hnsw_ef_search"] = int(ix.hnsw.efSearch)
    if ix is not None and hasattr(ix, "nprobe"):
        out.update(ivf_nprobe=int(ix.nprobe), ivf_nlist=int(ix.nlist))
    return out


def _read_mask(store, key: str, shape: tuple[int, int]):
    import numpy as np
    from PIL import Image

    mask = np.asarray(Image.open(store.open_read(key)).convert("L")) > 0
    if mask.shape != shape:
        raise ValueError(f"mask {key} is {mask.shape}, image map is {shape}")
    return mask


def run_score(config, data: str, model_dir: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from patchaudit.evaluation import metrics
    from patchaudit.store.objects import open_store
    from patchaudit.workers.datasets import discover, require_test
    from patchaudit.workers.decode import DecodeError, decode_image
    from patchaudit.workers.features import flatten_patches, to_tensor_batch
    from patchaudit.workers.maps import map_stats_batch, smooth_maps, to_original, to_original_tensor
    from patchaudit.workers.model import load_model
    from patchaudit.workers.pipeline import batched, score_keys

    load0 = load_avg()
    store = open_store(data)
    items = require_test(discover(store))
    keys = [t.key for t in items]
    t0 = time.perf_counter()
    model = load_model(model_dir, knn_backend=config.run.knn_backend)
    model_load_s = time.perf_counter() - t0
    if not model.has_maps:
        raise SystemExit(f"this benchmark needs a method with anomaly maps; {model.method} has none")
    cfg = model.config
    bs = cfg.batch_size
    prep = model.preprocess

    def maps_of(scored, decoded):
        smaps = smooth_maps(scored.grid_maps, prep.input_size, cfg.map_sigma)
        return [to_original(smaps[j], d.original_size, cfg.image_size, cfg.center_crop) for j, d in enumerate(decoded)]

    # Warm-up on the first batch: backbone, k-NN and maps once each, untimed.
    with torch.inference_mode():
        warm = [decode_image(store.read_bytes(k), prep) for k in keys[:bs]]
        for _ in range(2):
            x = to_tensor_batch([d.pixels for d in warm], model.backbone.mean, model.backbone.std, model.device)
            maps_of(model.score_embeddings(model.embed(x)), warm)

    # 1. End to end, exactly as `eval`/`score` run it (maps computed, not kept).
    t0, c0 = time.perf_counter(), time.process_time()
    e2e = list(score_keys(model, store.read_bytes, keys, threads=config.run.decode_threads, keep_maps=False))
    e2e_s, e2e_cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_scoring = peak_rss_mb()
    ok = [r for r in e2e if r.error is None]
    pipeline_ms = {  # what the pipeline itself records per image (decode overlaps the rest)
        "decode_threaded": float(np.mean([r.decode_ms for r in ok])),
        "features_plus_maps": float(np.mean([r.feature_ms for r in ok])),
        "knn": float(np.mean([r.knn_ms for r in ok])),
    }

    # 2. Stage by stage. Decode on one thread first (read + decode timed apart), then per batch.
    clock = Stopwatch()
    decoded = []
    for item in items:
        with clock("read"):
            raw = store.read_bytes(item.key)
        try:
            with clock("decode"):
                img = decode_image(raw, prep)
        except DecodeError:
            continue
        decoded.append((item, img))

    approx = cfg.method == "patchcore" and cfg.patchcore.index != "flat"
    exact_index = _exact_twin(model.index) if approx else None
    bank = np.concatenate([sh.vectors() for sh in exact_index.shards]) if approx else None  # (N, D), global ids
    records, exact_records, max_diff, knn_search_ms = [], [], 0.0, 0.0
    recall = {"same_id": 0, "same_distance": 0, "queries": 0}
    miss_ratios, score_err = [], []  # per missed patch; per image |approximate - exact| score
    e2e_by_key = {r.key: r for r in ok}
    with torch.inference_mode():
        for batch in batched(decoded, bs):
            imgs = [d for _, d in batch]
            with clock("features", len(imgs)):
                x = to_tensor_batch([d.pixels for d in imgs], model.backbone.mean, model.backbone.std, model.device)
                emb = model.embed(x)  # (B, D, h, w)
            with clock("knn", len(imgs)):  # k-NN search plus the patch max (the max is ~1% of it)
                scored = model.score_embeddings(emb)
            knn_search_ms += scored.knn_ms
            with clock("smooth", len(imgs)):
                smaps = smooth_maps(scored.grid_maps, prep.input_size, cfg.map_sigma)  # (B, H_in, W_in)
            exact_maps = None
            if approx:
                q = flatten_patches(emb).float().cpu().numpy()  # (B*h*w, D)
                with clock("approx_search", len(imgs)):  # both searches timed here, at the same load
                    a_ids = model.index.search(q, 1)[1][:, 0]
                with clock("exact_search", len(imgs)):
                    e_ids = exact_index.search(q, 1)[1][:, 0]
                rs = recall_stats(a_ids, e_ids, true_sq_dists(q, bank, a_ids), true_sq_dists(q, bank, e_ids))
                miss_ratios.append(rs.pop("miss_ratios"))
                recall = {k: recall[k] + v for k, v in rs.items()}
                exact_scored = model.score_embeddings(emb, exact_index)
                exact_maps = maps_of(exact_scored, imgs)
                score_err.append(np.abs(scored.image_scores - exact_scored.image_scores))
            for j, (item, img) in enumerate(batch):
                with clock("to_original"):  # as the worker: the map stays where it was computed
                    amap = to_original_tensor(smaps[j], img.original_size, cfg.image_size, cfg.center_crop)
                with clock("map_stats"):
                    st = map_stats_batch([amap], model.threshold)[0]
                # Keep a copy and free the timed map, so the next to_original reuses its memory as the
                # pipeline does (keeping every fresh map would time page faults, not interpolation).
                kept, amap = amap.cpu().numpy().copy(), None
                score = float(scored.image_scores[j])
                ref = e2e_by_key.get(item.key)
                if ref is not None:  # the stage-by-stage pass must reproduce the pipeline
                    max_diff = max(max_diff, abs(ref.score - score), abs(ref.stats.map_max - st.map_max))
                mask = None
                if item.mask_key is not None:
                    mask = _read_mask(store, item.mask_key, kept.shape)
                elif item.label == 0:
                    mask = np.zeros(kept.shape, dtype=bool)
                records.append(metrics.EvalRecord(item.label, item.defect_type, score, kept, mask))
                if exact_maps is not None:
                    exact_records.append(
                        metrics.EvalRecord(
                            item.label, item.defect_type, float(exact_scored.image_scores[j]), exact_maps[j], mask
                        )
                    )
    n_img = len(decoded)
    stages_ms = clock.per_item(n_img)
    stages_ms["maps_total"] = _sum_stages(stages_ms, ("smooth", "to_original", "map_stats"))
    stages_ms["sum"] = _sum_stages(stages_ms, ("read", "decode", "features", "knn", "maps_total"))
    stages_ms["knn_search_only"] = {"wall": knn_search_ms / n_img, "cpu": None, "best": None}  # score_embeddings' own

    t0 = time.perf_counter()
    acc = accuracy_summary(metrics.evaluate(records, model.threshold))
    metrics_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "n_test_images": len(items),
        "n_scored": len(ok),
        "n_errors": len(e2e) - len(ok),
        "model_load_s": model_load_s,
        "end_to_end_s": e2e_s,
        "end_to_end_cpu_s": e2e_cpu,
        "images_per_s": len(items) / e2e_s,
        "decode_threads": config.run.decode_threads,
        "torch_threads": torch.get_num_threads(),
        "batch_size": bs,
        "stages_ms_per_image": stages_ms,
        "pipeline_ms_per_image": pipeline_ms,
        "stage_pass_max_abs_diff_vs_pipeline": max_diff,
        "metrics_s": metrics_s,
        "peak_rss_mb_scoring": rss_scoring,
        "peak_rss_mb_with_evaluation": peak_rss_mb(),
        "index": _index_params(model.index) if getattr(model, "index", None) is not None else None,
        "accuracy": acc,
        "load_avg_start": load0,
        "load_avg_end": load_avg(),
    }
    if approx:
        exact_acc = accuracy_summary(metrics.evaluate(exact_records, model.threshold))
        ratios, err = np.concatenate(miss_ratios), np.concatenate(score_err)
        search_ms = {k: stages_ms.pop(f"{k}_search") for k in ("approx", "exact")}
        exact_scores = np.array([r.score for r in exact_records])
        out["approximate"] = {
            "recall_at_1_same_id": recall["same_id"] / recall["queries"],
            "recall_at_1_same_distance": recall["same_distance"] / recall["queries"],
            "queries": recall["queries"],
            "missed_patches": int(ratios.size),
            "miss_distance_ratio_median": float(np.median(ratios)) if ratios.size else None,
            "miss_distance_ratio_max": float(ratios.max()) if ratios.size else None,
            # beyond float rounding (flat search uses the BLAS expansion, IVF/HNSW direct distances)
            "images_with_a_changed_score": int(np.count_nonzero(err > 1e-4 * np.abs(exact_scores))),
            "image_score_abs_err_max": float(err.max()),
            "image_score_abs_err_mean": float(err.mean()),
            "exact_image_score_median": float(np.median(exact_scores)),
            "search_ms_per_image": search_ms,  # {"approx"|"exact": {"wall", "cpu", "best"}}
            "exact_accuracy": exact_acc,
            "delta_vs_exact": metric_deltas(acc, exact_acc),
        }
    return out


# --------------------------------------------------------------------------- orchestration and output


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"MVTec-style category dir (default {DEFAULT_DATA})")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--coreset", type=float, help="override model.patchcore.coreset_ratio, in (0, 1]")
    p.add_argument("--index", choices=("flat", "hnsw", "ivf"), help="override model.patchcore.index")
    p.add_argument("--backbone", help="override model.backbone (a timm name with weights available offline)")
    p.add_argument("--ef-search", type=int, help="override model.patchcore.hnsw_ef_search")
    p.add_argument("--nprobe", type=int, help="override model.patchcore.ivf_nprobe")
    p.add_argument("--decode-threads", type=int, help="override run.decode_threads")
    p.add_argument("--knn-backend", choices=("auto", "faiss", "torch"), help="override run.knn_backend (scoring)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--phase", choices=("all", "fit", "score"), default="all", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    return p


def _config(args: argparse.Namespace):
    from patchaudit.scheduler.config import load_config

    return apply_overrides(
        load_config(args.config),
        args.coreset,
        args.index,
        args.backbone,
        args.ef_search,
        args.nprobe,
        args.decode_threads,
        args.knn_backend,
    )


def _child(argv: list[str], phase: str, model_dir: str, tmp: str) -> dict[str, Any]:
    out = os.path.join(tmp, f"{phase}.json")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        *argv,
        "--phase",
        phase,
        "--model-dir",
        model_dir,
        "--phase-out",
        out,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the {phase} phase failed (exit status {proc.returncode}); its error is printed above")
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


def _meta(args: argparse.Namespace, config) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    pc = config.model.patchcore
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "data": os.path.basename(os.path.normpath(args.data)),
        "config": os.path.relpath(args.config, REPO) if os.path.isabs(args.config) else args.config,
        "method": config.model.method,
        "backbone": config.model.backbone,
        "image_size": list(config.model.image_size),
        "center_crop": config.model.center_crop,
        "coreset_ratio": pc.coreset_ratio,
        "index": pc.index,
        "hnsw_ef_search": pc.hnsw_ef_search,
        "ivf_nprobe": pc.ivf_nprobe,
        "decode_threads": config.run.decode_threads,
        "knn_backend": config.run.knn_backend,
    }


def _f(v: Any, fmt: str = ".4f") -> str:
    return "n/a" if v is None else format(v, fmt)


def format_report(res: dict[str, Any]) -> str:
    m, fit, sc = res["meta"], res["fit"], res["score"]
    acc, st = sc["accuracy"], sc["stages_ms_per_image"]
    lines = [
        f"{m['data']}: {m['method']} {m['backbone']} {m['image_size'][0]}x{m['image_size'][1]}, coreset "
        f"{m['coreset_ratio']}, index {m['index']} ({m.get('knn_backend', 'auto')} k-NN) | "
        f"{m['cpu']} x{m['cpu_count']} | load "
        f"{res['load_avg_before']} -> {res['load_avg_after']} (1/5/15 min)",
        "",
        f"fit  ({fit['n_fit_images']} images + {fit['n_calibration_images']} held out; "
        f"{fit['patches']} patches -> bank {fit['bank_size']} x {fit['feature_dim']})",
        f"  backbone load {fit['backbone_load_s']:7.2f} s",
        f"  features      {fit['features_s']:7.2f} s   (decode threads + backbone + patch embedding)",
        f"  coreset       {fit['coreset_s']:7.2f} s",
        f"  index build   {fit['index_s']:7.2f} s",
        f"  calibration   {fit['calibration_s']:7.2f} s",
        f"  total         {fit['total_s']:7.2f} s   (CPU {fit['total_cpu_s']:.1f} s)   peak RSS "
        f"{fit['peak_rss_mb']:.0f} MB (fit process)",
        "",
        f"score ({sc['n_test_images']} test images, batch {sc['batch_size']}, {sc['decode_threads']} decode threads, "
        f"{sc['torch_threads']} torch threads)",
        f"  end to end    {sc['images_per_s']:7.2f} img/s  ({sc['end_to_end_s']:.2f} s wall, "
        f"{1e3 * sc['end_to_end_s'] / sc['n_test_images']:.1f} ms/img; CPU {sc['end_to_end_cpu_s']:.2f} s, "
        f"{1e3 * sc['end_to_end_cpu_s'] / sc['n_test_images']:.1f} ms/img)",
        "  per stage, ms/img, run one after another (decode on one thread); best = fastest batch (or image):",
        f"    {'stage':<16} {'wall':>8} {'CPU':>8} {'best':>8}",
    ]
    for k in (
        "read",
        "decode",
        "features",
        "knn",
        "knn_search_only",
        "smooth",
        "to_original",
        "map_stats",
        "maps_total",
        "sum",
    ):
        lines.append(f"    {k:<16} {st[k]['wall']:8.2f} {_f(st[k]['cpu'], '8.2f'):>8} {_f(st[k]['best'], '8.2f'):>8}")
    lines += [
        f"  peak RSS      {sc['peak_rss_mb_scoring']:.0f} MB scoring, {sc['peak_rss_mb_with_evaluation']:.0f} MB "
        f"with evaluation (maps kept)",
        "",
        f"{'subset':<16} {'n':>5} {'image AUROC':>12} {'pixel AUROC':>12} {'AUPRO@0.3':>10}",
        f"{'all':<16} {acc['n_images']:>5} {_f(acc['image_auroc']):>12} {_f(acc['pixel_auroc']):>12} "
        f"{_f(acc['aupro']):>10}",
    ]
    for name, d in sorted(acc.get("per_defect", {}).items()):
        lines.append(
            f"{name:<16} {d['count']:>5} {_f(d['image_auroc']):>12} {_f(d['pixel_auroc']):>12} {_f(d['aupro']):>10}"
        )
    lines.append(
        f"threshold {acc['threshold']:.4f}: F1 {acc['f1']:.4f} precision {acc['precision']:.4f} "
        f"recall {acc['recall']:.4f}; pixel metrics on {acc['pixel_images']} images, "
        f"{acc['pixel_excluded']} excluded (empty mask)"
    )
    if acc.get("pixel_auroc_within_defective") is not None:
        lines.append(
            f"pixel AUROC, defect pixels against the normal pixels of defective images only "
            f"{_f(acc['pixel_auroc_within_defective'])}, "
            f"of good images only {_f(acc.get('pixel_auroc_vs_good'))}"
        )
    ap = sc.get("approximate")
    if ap:
        ex, dl = ap["exact_accuracy"], ap["delta_vs_exact"]
        lines += [
            "",
            f"approximate index {sc['index']}",
            f"  recall@1 {ap['recall_at_1_same_id']:.4f} (same id), {ap['recall_at_1_same_distance']:.4f} (same "
            f"distance) over {ap['queries']} test patches; {ap['missed_patches']} misses at "
            f"{_f(ap['miss_distance_ratio_median'], '.3f')}x the exact distance (median), "
            f"{_f(ap['miss_distance_ratio_max'], '.3f')}x (max)",
            f"  image scores: {ap['images_with_a_changed_score']} of {sc['n_scored']} changed, |approximate - exact| "
            f"max {ap['image_score_abs_err_max']:.3f}, mean {ap['image_score_abs_err_mean']:.3f} (exact median score "
            f"{ap['exact_image_score_median']:.3f})",
            f"  search ms/img, same queries, same load: approximate {ap['search_ms_per_image']['approx']['wall']:.2f} "
            f"wall / {ap['search_ms_per_image']['approx']['cpu']:.2f} CPU / "
            f"{ap['search_ms_per_image']['approx']['best']:.2f}"
            f" best; exact {ap['search_ms_per_image']['exact']['wall']:.2f} / "
            f"{ap['search_ms_per_image']['exact']['cpu']:.2f} / {ap['search_ms_per_image']['exact']['best']:.2f}",
            f"  exact on the same bank: image AUROC {_f(ex['image_auroc'])}, pixel AUROC {_f(ex['pixel_auroc'])}, "
            f"AUPRO {_f(ex['aupro'])}",
            f"  approximate - exact:    image AUROC {_f(dl['image_auroc'], '+.4f')}, pixel AUROC "
            f"{_f(dl['pixel_auroc'], '+.4f')}, AUPRO {_f(dl['aupro'], '+.4f')}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = _config(args)
    if args.phase != "all":
        if not args.model_dir or not args.phase_out:
            raise SystemExit("--phase needs --model-dir and --phase-out")
        run = run_fit if args.phase == "fit" else run_score
        result = run(config, args.data, args.model_dir)
        with open(args.phase_out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=float)
        return 0
    load_before = load_avg()
    with tempfile.TemporaryDirectory(prefix="fit_score_") as tmp:
        model_dir = os.path.join(tmp, "model")
        fit = _child(argv, "fit", model_dir, tmp)
        score = _child(argv, "score", model_dir, tmp)
    res = {
        "meta": _meta(args, config),
        "load_avg_before": load_before,
        "load_avg_after": load_avg(),
        "fit": fit,
        "score": score,
    }
    print(format_report(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no runs/
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2, default=float)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
