"""`patchaudit` command line: argument parsing only; the work lives in scheduler.local / scheduler.run.

Importing this module must not import torch (`patchaudit --help` stays instant).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from patchaudit.errors import PatchauditError, raise_terminated, was_terminated

EPILOG = """examples:
  patchaudit fit   --data ../shared/data/mvtec_ad/bottle --config configs/default.yaml --out models/bottle
  patchaudit eval  --data ../shared/data/mvtec_ad/bottle --model models/bottle --out eval/bottle
  patchaudit score --input s3://bucket/images/2026-11-27 --model s3://bucket/models/bottle \\
                   --report s3://bucket/reports/2026-11-27 --run-id nightly-2026-11-27
  patchaudit status nightly-2026-11-27
  patchaudit audit --spec configs/audit.example.yaml --date 2026-11-27 --lines bottle
  patchaudit diff  s3://bucket/reports/2026-11-27 s3://bucket/reports/2026-11-27-model-v2
  patchaudit similar --report reports/bottle --image ../shared/data/mvtec_ad/bottle/test/contamination/000.png
  patchaudit cluster --report reports/bottle --clusters 4
  patchaudit export --report reports/bottle --where "score > 2 * threshold" --cluster 1 --to export/bottle
  patchaudit bench --data ../shared/data/mvtec_ad/bottle --methods patchcore,padim,gaussian \\
                   --backbones tf_efficientnet_lite0,mobilenetv2_100 --sizes 224,256 --out runs/bench/bottle
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchaudit",
        description="Batch anomaly scoring of inspection images (PatchCore, PaDiM, Gaussian AD).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser(
        "fit", help="fit a model on defect-free images (threshold by k-fold cross-fitting over all of them)"
    )
    f.add_argument(
        "--data", required=True, help="MVTec-style category dir (uses train/good) or a folder of good images"
    )
    f.add_argument("--config", help="YAML config (default: built-in defaults = configs/default.yaml)")
    f.add_argument("--out", required=True, help="model directory or s3:// prefix to write")

    e = sub.add_parser("eval", help="score a category's test split and report image/pixel AUROC, AUPRO, F1")
    e.add_argument("--data", required=True, help="MVTec-style category dir with test/ and ground_truth/")
    e.add_argument("--model", required=True, help="fitted model directory or s3:// prefix")
    e.add_argument("--config", help="YAML config (only the run section is used)")
    e.add_argument("--out", help="where to write metrics.json and scores.parquet")

    s = sub.add_parser("score", help="score every image under --input and write a Parquet report")
    s.add_argument("--input", required=True, help="folder or s3:// prefix of images")
    s.add_argument("--model", required=True, help="fitted model directory or s3:// prefix")
    s.add_argument("--report", required=True, help="report directory or s3:// prefix")
    s.add_argument("--config", help="YAML config (the run section sets batch size, workers, retries)")
    s.add_argument("--run-id", help="run id; reuse one to resume a run (default: a new id)")
    s.add_argument("--single-process", action="store_true", help="score in this process: no Redis, no Ray")
    s.add_argument("--workers", type=int, help="feature workers (overrides run.feature_workers)")

    b = sub.add_parser("bench", help="fit and evaluate a grid of configurations; Pareto table and HTML report")
    b.add_argument("--data", required=True, help="MVTec-style category dir (train/good, test/, ground_truth/)")
    b.add_argument("--out", help="output folder (default: runs/bench/<category>); rerunning skips finished configs")
    b.add_argument(
        "--methods",
        default="patchcore,padim,gaussian",
        help="comma-separated, of: patchcore, padim, gaussian, simplenet (default: %(default)s)",
    )
    b.add_argument(
        "--backbones", default="tf_efficientnet_lite0", help="comma-separated timm names (default: %(default)s)"
    )
    b.add_argument(
        "--sizes",
        default="256",
        help="comma-separated input sizes in px: squash size x size, aspect the short "
        "side, tile the tile side "
        "(default: %(default)s)",
    )
    b.add_argument(
        "--geometry",
        default="squash",
        help="comma-separated input geometries: squash, aspect (short side = size, aspect kept), tile "
        "(size px tiles at model.tile_scale, overlap model.tile_overlap) (default: %(default)s)",
    )
    b.add_argument("--coreset", default="0.1", help="comma-separated PatchCore coreset ratios (default: %(default)s)")
    b.add_argument("--config", help="YAML config: base model settings (calibration, seed...) and run.decode_threads")
    b.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="recommend the fastest Pareto-optimal config within this accuracy of the best (default: %(default)s)",
    )
    b.add_argument(
        "--speed",
        choices=("wall", "cpu"),
        default="wall",
        help="speed axis: wall = images/s end to end; cpu = images per CPU-second (for a shared machine)",
    )
    b.add_argument(
        "--selection-fraction",
        type=float,
        default=0.5,
        help="share of the labelled test images (stratified by defect type) used to rank and recommend; "
        "the rest report the recommendation's numbers; 0 = rank on all (optimistic) "
        "(default: %(default)s)",
    )
    b.add_argument("--split-seed", type=int, default=0, help="seed of the selection/report cut (default: %(default)s)")
    b.add_argument("--heatmaps", type=int, default=3, help="overlays per kind and config (default: %(default)s)")
    b.add_argument("--timeout", type=float, help="seconds allowed per configuration (default: no limit)")
    b.add_argument("--keep-models", action="store_true", help="keep each fitted model under configs/<id>/model")

    a = sub.add_parser("audit", help="nightly audit: score each product line's new images of a night, incrementally")
    a.add_argument("--spec", required=True, help="audit spec YAML (lines: name, input template, model, report root)")
    when = a.add_mutually_exclusive_group()
    when.add_argument("--date", help="the night to audit, YYYY-MM-DD (default: yesterday, UTC)")
    when.add_argument("--since", help="audit every night from this date (YYYY-MM-DD) up to yesterday")
    a.add_argument("--lines", help="comma-separated line names (default: every line of the spec)")
    a.add_argument("--single-process", action="store_true", help="score in this process: no Redis, no Ray")
    a.add_argument("--workers", type=int, help="feature workers per run (overrides run.feature_workers)")
    a.add_argument("--fail-on-drift", action="store_true", help="exit 3 when a line's flag rate drifted")
    a.add_argument(
        "--retry-errors",
        action="store_true",
        help="score again the images whose earlier rows are all errors (default: they count as done)",
    )
    a.add_argument("--json", action="store_true", help="print the results as JSON instead of the summary")

    d = sub.add_parser("diff", help="compare two reports of the same images (flag changes, Spearman, per folder)")
    d.add_argument("old", metavar="OLD_REPORT", help="report folder or s3:// prefix of the earlier run")
    d.add_argument("new", metavar="NEW_REPORT", help="report folder or s3:// prefix of the later run")
    d.add_argument("--out", help="where to write the diff (default: NEW_REPORT/diff/)")
    d.add_argument("--top", type=int, default=10, help="flag changes and folders printed (default: %(default)s)")

    si = sub.add_parser("similar", help="the images most similar to one image, across one or many reports")
    si.add_argument("--report", action="append", required=True, help="report folder or s3:// prefix (repeatable)")
    si.add_argument("--image", required=True, help="an image URI of the report(s), or a new image file")
    si.add_argument("--k", type=int, default=20, help="how many (default: %(default)s)")
    si.add_argument(
        "--embedding",
        choices=("pooled", "peak"),
        default="pooled",
        help="whole-image (pooled) or the map's peak feature (default: %(default)s)",
    )
    si.add_argument("--model", help="model to embed a new file (default: the report's own model)")

    c = sub.add_parser("cluster", help="group a report's flagged images into K clusters (defect types)")
    c.add_argument("--report", required=True, help="report folder or s3:// prefix")
    c.add_argument("--clusters", type=int, required=True, help="K, the number of clusters")
    sel = c.add_mutually_exclusive_group()
    sel.add_argument(
        "--flagged",
        dest="flagged",
        action="store_true",
        default=True,
        help="cluster the flagged (anomalous) images (the default)",
    )
    sel.add_argument("--all", dest="flagged", action="store_false", help="cluster every scored image")
    c.add_argument(
        "--embedding",
        choices=("pooled", "peak"),
        default="peak",
        help="feature to cluster by (default: %(default)s, the feature at the map's peak)",
    )

    x = sub.add_parser("export", help="copy selected images and heatmaps with a JSONL/CSV manifest")
    x.add_argument("--report", required=True, help="report folder or s3:// prefix")
    x.add_argument(
        "--where",
        required=True,
        help='SQL predicate over the report\'s columns, folder and cluster, e.g. "score > 2 * threshold"',
    )
    x.add_argument("--cluster", type=int, help="only this cluster (after `patchaudit cluster`)")
    x.add_argument("--limit", type=int, help="at most this many images, the highest scores first")
    x.add_argument("--to", required=True, help="destination folder or s3:// prefix")

    st = sub.add_parser("status", help="progress of a run, from Redis")
    st.add_argument("run_id")
    st.add_argument("--redis-url", help="default: $REDIS_URL or redis://127.0.0.1:6379")
    return p


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return _dispatch(args)
    except PatchauditError as exc:
        print(f"patchaudit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # SIGINT (130) or SIGTERM (143): actors stopped, batches given back
        how, code = ("terminated", 143) if was_terminated(exc) else ("interrupted", 130)
        print(f"patchaudit {args.command}: {how}; re-run with the same --run-id to resume", file=sys.stderr)
        return code
    except Exception as exc:
        redis = sys.modules.get("redis")
        if redis is None or not isinstance(exc, redis.RedisError):
            raise
        # A Redis failure the command did not describe itself: still one line, without secrets.
        from patchaudit.queue.connection import describe_redis_error

        url = getattr(args, "redis_url", None) or os.environ.get("REDIS_URL") or ""
        print(f"patchaudit {args.command}: error: {describe_redis_error(exc, url)}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from patchaudit.scheduler.config import load_config

    if args.command == "status":
        from patchaudit.scheduler.status import print_status

        return print_status(args.run_id, args.redis_url)
    if args.command == "audit":
        return _audit(args)
    if args.command in MINING_COMMANDS:
        return _mining(args)
    config = load_config(getattr(args, "config", None))
    if args.command == "bench":
        return _bench(args, config)
    if args.command == "fit":
        from patchaudit.scheduler import local

        res = local.fit(config, args.data, args.out)
        _print(res)
        _print_calibration(res.get("calibration") or {}, res["threshold"])
        return 0
    if args.command == "eval":
        _check_model_geometry(args, config)
        from patchaudit.scheduler import local

        res = local.evaluate(config, args.data, args.model, args.out)
        local.print_eval_table(res)
        if args.out:
            print(f"wrote {res['out_uri']}/metrics.json and scores.parquet")
        return 0
    if args.command == "score":
        _check_model_geometry(args, config)
        if args.single_process:
            from patchaudit.scheduler import local

            res = local.score_single(config, args.input, args.model, args.report, args.run_id)
        else:
            from patchaudit.scheduler.run import run_score

            res = run_score(config, args.input, args.model, args.report, args.run_id, workers=args.workers)
        _print(
            {
                k: res[k]
                for k in (
                    "report_uri",
                    "run_id",
                    "rows",
                    "scored",
                    "anomalous",
                    "errors",
                    "images_per_second",
                    "skipped",
                    "already_complete",
                )
                if k in res
            }
        )
        return 0
    raise AssertionError(args.command)  # argparse restricts the choices


def _check_model_geometry(args: argparse.Namespace, config) -> None:
    """A --config asking for another input geometry than the model's is an error, not silently ignored."""
    if not args.config:
        return
    import yaml

    with open(args.config, encoding="utf-8") as f:
        given = yaml.safe_load(f)
    if not isinstance(given, dict) or not given.get("model"):
        return  # a config of run settings only asks for no geometry: the model's own is used
    from patchaudit.store.artifacts import read_manifest
    from patchaudit.store.objects import open_store
    from patchaudit.workers.geometry import check_same_geometry

    check_same_geometry(config.model, read_manifest(open_store(args.model)), args.config)


def _audit(args: argparse.Namespace) -> int:
    from patchaudit.scheduler.audit_spec import audit_dates, load_spec

    spec = load_spec(args.spec)  # every argument is checked before anything is imported or written
    lines = spec.select(args.lines)
    dates = audit_dates(args.date, args.since)
    if args.workers is not None and args.workers < 1:
        raise PatchauditError(f"--workers must be >= 1, got {args.workers}")
    from patchaudit.scheduler.audit import exit_code, format_result, run_audit

    def show(result) -> None:
        if not args.json:
            print(format_result(result), flush=True)

    results = run_audit(
        spec,
        lines,
        dates,
        single_process=args.single_process,
        workers=args.workers,
        progress=not args.json,
        retry_errors=args.retry_errors,
        on_result=show,
    )
    if args.json:
        _print([r.as_dict() for r in results])
    return exit_code(results, args.fail_on_drift)


MINING_COMMANDS = ("diff", "similar", "cluster", "export")


def _mining(args: argparse.Namespace) -> int:
    from patchaudit.mining import commands

    if args.command == "diff":
        commands.diff(args.old, args.new, args.out, args.top)
        return 0
    if args.command == "similar":
        commands.similar(args.report, args.image, args.k, args.embedding, args.model)
        return 0
    if args.command == "cluster":
        commands.cluster(args.report, args.clusters, args.flagged, args.embedding)
        return 0
    if args.command == "export":
        commands.export(args.report, args.where, args.to, args.cluster, args.limit)
        return 0
    raise AssertionError(args.command)


def _bench(args: argparse.Namespace, config) -> int:
    from patchaudit.bench import runner as bench
    from patchaudit.store.objects import open_store
    from patchaudit.workers.datasets import discover, require_test, require_train

    store = open_store(args.data)
    ds = discover(store)
    require_train(ds), require_test(ds)  # fail here, not once per configuration in the workers
    data = store.uri
    grid = bench.expand_grid(
        config.model,
        bench.parse_list(args.methods, "methods"),
        bench.parse_list(args.backbones, "backbones"),
        bench.parse_list(args.sizes, "sizes", int),
        bench.parse_list(args.coreset, "coreset", float),
        geometries=bench.parse_list(args.geometry, "geometry"),
    )
    out = args.out or os.path.join("runs", "bench", os.path.basename(os.path.normpath(args.data)))
    options = bench.BenchOptions(
        decode_threads=config.run.decode_threads,
        heatmaps=args.heatmaps,
        keep_models=args.keep_models,
        timeout_s=args.timeout,
        tolerance=args.tolerance,
        speed=args.speed,
        selection_fraction=args.selection_fraction,
        split_seed=args.split_seed,
    )
    summary = bench.run_bench(data, out, grid, options)
    print(bench.markdown_table(summary["rows"]))
    for key in ("recommended", "recommended_image"):
        rec = summary.get(key)
        if rec:
            print(f"{key.replace('_', ' ')}: {rec['label']} ({rec['reason']})")
            if "report" in rec:
                print(
                    f"  {rec['metric']}: report part {bench._f(rec['report'])} (shown), selection part "
                    f"{bench._f(rec['selection'])} (ranked on), full split {bench._f(rec['full'])}; "
                    f"choosing on the full split would have shown {bench._f(rec['optimistic_full'])}"
                )
    print(f"wrote {out}/report.html, results.json, results.parquet")
    return 0


def _print_calibration(cal: dict, threshold: float) -> None:
    """One line on stderr: what the threshold means, as an estimated false-positive rate with its interval."""
    if cal.get("method") != "cross-fit":
        return
    lo, hi = cal["estimated_fpr_ci95"]
    note = (
        ""
        if cal["target_attainable"]
        else (f" (too few images to vouch for {cal['target_fpr']:.1%}: the threshold is the largest score)")
    )
    print(
        f"threshold {threshold:.4g}: flags an estimated {cal['estimated_fpr']:.1%} of good images "
        f"(95% interval {lo:.1%}-{hi:.1%}; target {cal['target_fpr']:.1%}), from out-of-sample scores of "
        f"{cal['n_images']} training images in {cal['folds']} folds{note}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
