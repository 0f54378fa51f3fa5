"""Single-process commands: fit, eval, and `score --single-process` (the reference the distributed run must match).

The CLI and the Python API import this module only when one of these commands runs, so `--help` stays light.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from patchaudit.evaluation import metrics
from patchaudit.scheduler.config import Config
from patchaudit.scheduler.finish import finish_report
from patchaudit.scheduler.plan import batch_id, commit_plan, finished_summary, new_run_id, prepare_plan
from patchaudit.store import listing as listings
from patchaudit.store import reports
from patchaudit.store.artifacts import read_manifest
from patchaudit.store.embeddings import write_embeddings
from patchaudit.store.objects import ObjectInfo, open_store
from patchaudit.workers.datasets import discover, require_test, require_train
from patchaudit.workers.fit import fit_model
from patchaudit.workers.model import load_model
from patchaudit.workers.pipeline import score_keys
from patchaudit.workers.rows import build_embeddings, build_rows


def progress_factory(enabled: bool = True) -> Callable[[str, int], Callable[[int], None]]:
    """tqdm progress bars on stderr (off when not a terminal)."""
    bars = []

    def make(stage: str, total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=stage, unit="img", disable=None if enabled else True, file=sys.stderr, leave=False)
        bars.append(bar)
        return bar.update

    return make


def fit(config: Config, data_uri: str, out_uri: str) -> dict[str, Any]:
    store = open_store(data_uri)
    keys = require_train(discover(store))
    model, info = fit_model(config.model, store, keys, progress_factory(), threads=config.run.decode_threads)
    manifest = model.save(out_uri)
    return {
        "model_uri": open_store(out_uri).uri,
        "model_id": manifest["model_id"],
        "threshold": model.threshold,
        "bank_size": manifest.get("bank_size"),
        **info,
    }


def evaluate(config: Config, data_uri: str, model_uri: str, out_uri: str | None) -> dict[str, Any]:
    """Score a category's test split and compute metrics; labels are used for nothing else."""
    store = open_store(data_uri)
    ds = discover(store)
    items = require_test(ds)
    model = load_model(model_uri, knn_backend=config.run.knn_backend)
    t0 = time.perf_counter()
    results = list(
        score_keys(
            model,
            store.read_bytes,
            [t.key for t in items],
            threads=config.run.decode_threads,
            keep_maps=model.has_maps,
            progress=progress_factory()("eval", len(items)),
        )
    )
    seconds = time.perf_counter() - t0
    records, rows, errors = [], [], []
    for item, r in zip(items, results):
        if r.error is not None:
            errors.append({"key": item.key, "error": r.error})
            continue
        mask = None
        if r.amap is not None:
            if item.mask_key is not None:
                mask = np.asarray(Image.open(store.open_read(item.mask_key)).convert("L")) > 0
                if mask.shape != r.amap.shape:  # masks are defined on the stored image's pixels
                    raise ValueError(f"mask {item.mask_key} is {mask.shape}, image map is {r.amap.shape}")
            elif item.label == 0:
                mask = np.zeros(r.amap.shape, dtype=bool)
        records.append(metrics.EvalRecord(item.label, item.defect_type, cast(float, r.score), r.amap, mask))
        rows.append(
            {
                "key": item.key,
                "defect_type": item.defect_type,
                "label": item.label,
                "score": r.score,
                "is_anomalous": r.is_anomalous,
                "map_max": r.stats.map_max if r.stats else None,
                "anomalous_area_fraction": r.stats.anomalous_area_fraction if r.stats else None,
            }
        )
    result = metrics.evaluate(records, model.threshold)
    result.update(
        model_id=model.model_id,
        method=model.method,
        backbone=model.backbone.name,
        data=ds.uri,
        images_per_second=len(items) / seconds,
        seconds=seconds,
        decode_errors=errors,
    )
    if out_uri:
        out = open_store(out_uri)
        out.write_bytes("metrics.json", json.dumps(result, indent=2).encode())
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        out.write_bytes("scores.parquet", buf.getvalue())
        result["out_uri"] = out.uri
    return result


def score_single(
    config: Config,
    input_uri: str,
    model_uri: str,
    report_uri: str,
    run_id: str | None,
    listing: list[ObjectInfo] | None = None,
) -> dict[str, Any]:
    """Score every image under `input_uri` (or only `listing`) in this process and write the standard report.

    Planned by the same rules as a distributed run (scheduler.plan): the same refusals, the same
    batches, and the same run id resumes it (batches with a part are not scored again).
    """
    run_id = run_id or new_run_id()
    src, report, model_store = open_store(input_uri), open_store(report_uri), open_store(model_uri)
    manifest = read_manifest(model_store)
    finished = finished_summary(report, run_id)
    if finished is not None:
        return finished
    plan = prepare_plan(
        report, src, run_id, config.run.batch_size, manifest["model_id"], model_store.uri, "single-process", listing
    )
    # Loaded before the plan is written: a bad --model must not leave a half-made report behind.
    model = load_model(model_uri, knn_backend=config.run.knn_backend)
    commit_plan(report, plan)
    reports.clear_complete(report)
    have = set(reports.list_parts(report))
    todo_images = sum(
        min(plan.batch_size, plan.images - n * plan.batch_size)
        for n in range(plan.n_batches)
        if batch_id(n) not in have
    )
    advance = progress_factory()("score", todo_images)
    t0 = time.perf_counter()
    with plan.listing_path(report) as path:
        slices = listings.ListingSlices(path, report.uri_for(reports.LISTING_KEY))
        for n in range(plan.n_batches):
            if batch_id(n) in have:
                continue
            by_key = {i.key: i for i in slices.slice(n * plan.batch_size, plan.batch_size)}
            _score_batch(config, model, src, report, run_id, batch_id(n), by_key)
            advance(len(by_key))
    seconds = time.perf_counter() - t0
    return finish_report(
        report,
        plan,
        model_id=model.model_id,
        threshold=model.threshold,
        top_k=config.run.top_k,
        seconds=seconds,
        extra={"input_uri": src.uri, "model_uri": model_store.uri, "mode": "single-process"},
        images_now=todo_images,
    )


def _score_batch(
    config: Config, model: Any, src: Any, report: Any, run_id: str, batch: str, by_key: dict[str, ObjectInfo]
) -> None:
    """Score one batch and write its part (the batch's commit, last)."""
    keys = list(by_key)
    results = list(
        score_keys(
            model,
            src.read_bytes,
            keys,
            threads=config.run.decode_threads,
            keep_maps="anomalous" if config.run.heatmaps else False,
            keep_images=config.run.heatmaps,
            embeddings=config.run.embeddings,
        )
    )
    rows = build_rows(
        results,
        by_key,
        run_id,
        model,
        attempt=0,
        worker="single-process",
        heatmap_store=report if config.run.heatmaps else None,
    )
    vectors = build_embeddings(results, by_key, model) if config.run.embeddings else None
    if vectors is not None:  # before the part: the part is the batch's commit
        write_embeddings(report, batch, vectors)
    reports.write_part(report, batch, rows)


def print_eval_table(result: dict[str, Any], file=None) -> None:
    file = file or sys.stdout  # looked up at call time: callers may have redirected it

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    print(f"{'subset':<16} {'n':>5} {'image AUROC':>12} {'pixel AUROC':>12} {'AUPRO@0.3':>10}", file=file)
    print(
        f"{'all':<16} {result['n_images']:>5} {f(result['image_auroc']):>12} {f(result['pixel_auroc']):>12} "
        f"{f(result['aupro']):>10}",
        file=file,
    )
    for name, d in sorted(result.get("per_defect", {}).items()):
        print(
            f"{name:<16} {d['count']:>5} {f(d['image_auroc']):>12} {f(d['pixel_auroc']):>12} {f(d['aupro']):>10}",
            file=file,
        )
    if result.get("pixel_auroc_within_defective") is not None:
        print(
            f"pixel AUROC, defect pixels against the normal pixels of defective images only "
            f"{f(result['pixel_auroc_within_defective'])}, of good images only {f(result.get('pixel_auroc_vs_good'))}",
            file=file,
        )
    print(
        f"threshold {result['threshold']:.4f} (calibrated on held-out good images): "
        f"F1 {result['f1']:.4f}  precision {result['precision']:.4f}  recall {result['recall']:.4f}",
        file=file,
    )
