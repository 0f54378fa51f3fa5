"""The orchestration ceiling of one feature worker: the real `patchaudit score` path with no model work.

    python benchmarks/orchestration.py [--files 20000] [--batch-sizes 32 256] [--model URI]
                                       [--set run.KEY=VALUE ...] [--out runs/orchestration/results.json]

The input is `--files` zero-byte `.png` files in a local folder: every image becomes an error row
("empty file") without touching the backbone, so what is measured is everything around the model:
claim, read, decode attempt, rows, the Parquet part, the ack, heartbeats. Each batch size runs in a
child process of its own (local Ray, the Redis `patchaudit score` would use, one feature worker),
cold like a real run.

Reported per run (images/s per worker):
- `worker_rate`: images / the worker's own loop time (its `seconds` counter: from its first claim
  to the end of the run, start-up excluded);
- `steady_rate`: from the report parts' write times, the first part left out (benchmarks/distributed.py);
- `worker cpu ms/img`: the feature worker process's own CPU time (all its threads) per image;
- CPU seconds of the run's process tree (driver, Redis client, Ray's daemons and the actors), in
  total and per 1,000 images over the steady window: on a shared machine, CPU time is the number
  that does not depend on the neighbours.
Without `--model` a tiny PatchCore model (64x64, on 8 synthetic images) is fitted first: its size does
not matter, no image reaches it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOAL_IMAGES_PER_S = 5000.0  # per worker at the default batch size, zero-cost model


# --------------------------------------------------------------------------- pure helpers


def parse_sets(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`run.key=value` overrides (values parsed as YAML scalars) as {"run": {key: value}}. Only the run
    section: the model's settings come from the fitted model."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot or not key or section != "run":
            raise ValueError(f"--set takes run.KEY=VALUE, got {item!r}")
        out.setdefault(section, {})[key] = yaml.safe_load(value)
    return out


def make_empty_files(folder: Path, n: int) -> int:
    """`n` zero-byte .png files under `folder` (kept if already there); returns how many exist."""
    if n < 1:
        raise ValueError(f"--files must be >= 1, got {n}")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = folder / f"img_{i:08d}.png"
        if not p.exists():
            p.touch()
    return n


def rates(images: int, worker_seconds: float | None, steady: float | None) -> dict[str, float | None]:
    """images/s per worker, two ways (module docstring), and the milliseconds per image they mean."""
    worker_rate = images / worker_seconds if worker_seconds else None
    return {
        "worker_rate": worker_rate,
        "steady_rate": steady,
        "ms_per_image": 1e3 / worker_rate if worker_rate else None,
    }


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'batch':>6} {'settings':<28} {'images':>7} {'worker img/s':>12} {'steady img/s':>12} "
        f"{'ms/img':>7} {'worker cpu ms/img':>17} {'cpu s':>7} {'cpu s/1k img':>12} {'wall s':>7} {'load':>5}"
    )
    lines = [head, "-" * len(head)]

    def f(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    for r in runs:
        sets = ",".join(f"{k}={v}" for s in r.get("sets", {}).values() for k, v in s.items()) or "defaults"
        lines.append(
            f"{r['batch_size']:>6} {sets[:28]:<28} {r['images']:>7} {f(r['worker_rate'], '.0f'):>12} "
            f"{f(r['steady_rate'], '.0f'):>12} {f(r['ms_per_image'], '.3f'):>7} "
            f"{f(r.get('worker_cpu_ms_per_image'), '.3f'):>17} {f(r['cpu_s'], '.1f'):>7} "
            f"{f(r['cpu_s_per_1k_steady'], '.2f'):>12} {f(r['wall_s'], '.1f'):>7} {r['load_before'][0]:>5.1f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- model


def fit_tiny_model(out: Path) -> str:
    """A PatchCore model at 64x64 fitted on 8 synthetic noise images; returns its URI."""
    import numpy as np
    from PIL import Image

    from patchaudit.scheduler.config import config_from_dict
    from patchaudit.scheduler.local import fit

    good = out / "good"
    good.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good / f"{i:03d}.png")
    cfg = config_from_dict({"model": {"image_size": [64, 64], "calibration": {"folds": 2}}})
    fit(cfg, str(good), str(out / "model"))
    return str(out / "model")


# --------------------------------------------------------------------------- child run


def _config(batch_size: int, sets: dict[str, dict[str, Any]]) -> Any:
    from patchaudit.scheduler.config import Config
    from patchaudit.schema import from_dict

    cfg = Config()
    run = dataclasses.asdict(cfg.run) | {"batch_size": batch_size, "feature_workers": 1} | sets.get("run", {})
    return Config(model=cfg.model, run=from_dict(type(cfg.run), run, "run"))


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measured run in this fresh process; prints only the JSON result."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
    sys.path.insert(0, str(HERE))
    import pyarrow.parquet as pq
    import redis
    from distributed import CpuSampler, cpu_between, load_avg, steady_throughput

    from patchaudit.queue.streams import BatchQueue
    from patchaudit.scheduler import run as srun
    from patchaudit.scheduler.local_redis import ensure_redis

    sets = json.loads(args.child_sets)
    cfg = _config(args.child_batch, sets)
    report_dir = Path(args.child_report)
    out: dict[str, Any] = {"batch_size": args.child_batch, "sets": sets, "load_before": load_avg()}
    sampler = CpuSampler().start()
    started = time.time()
    summary = srun.run_score(cfg, args.images, args.model, str(report_dir), workers=1, progress=False)
    wall = time.time() - started
    series = sampler.stop()
    with ensure_redis(cfg.run.redis_url) as handle:  # leave no run keys behind in a shared Redis
        BatchQueue(redis.Redis.from_url(handle.url), summary["run_id"]).delete()
    parts = []
    for p in (report_dir / "parts").glob("*.parquet"):
        meta = pq.read_metadata(p)
        parts.append(("w", p.stat().st_mtime, meta.num_rows))
    times = sorted((t, n) for _, t, n in parts)
    steady = steady_throughput(parts)["images_per_s"]
    steady_cpu = cpu_between(series, times[0][0], times[-1][0]) if len(times) > 1 else None
    later = sum(n for _, n in times[1:])
    workers = summary.get("workers") or []
    worker_seconds = sum(w["seconds"] for w in workers) or None
    worker_cpu = sum(w["cpu_s"] for w in workers) if workers and all("cpu_s" in w for w in workers) else None
    out.update(
        images=int(summary["rows"]),
        errors=int(summary["errors"]),
        parts=len(parts),
        wall_s=wall,
        run_s=summary["seconds"],
        worker_seconds=worker_seconds,
        worker_cpu_ms_per_image=worker_cpu / int(summary["rows"]) * 1e3 if worker_cpu is not None else None,
        worker_stats=workers,
        cpu_s=series[-1][1] if series else None,
        cpu_s_per_1k_steady=steady_cpu / later * 1e3 if steady_cpu is not None and later else None,
        load_after=load_avg(),
        **rates(int(summary["rows"]), worker_seconds, steady),
    )
    return out


def run_child(args: argparse.Namespace, batch: int, images: str, model: str, report: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child-batch",
        str(batch),
        "--child-report",
        str(report),
        "--child-sets",
        json.dumps(parse_sets(args.set)),
        "--images",
        images,
        "--model",
        model,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run at batch {batch} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=20000, help="zero-byte images in the input folder")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256], help="run.batch_size values to measure")
    p.add_argument("--model", default=None, help="a fitted model URI; default: fit a tiny one first")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="run.KEY=VALUE",
        help="config override for every measured run, e.g. run.decode_threads=4 (repeatable)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per batch size")
    p.add_argument("--out", default=os.path.join("runs", "orchestration", "results.json"))
    p.add_argument("--images", default=None, help=argparse.SUPPRESS)  # child only
    p.add_argument("--child-batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-report", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-sets", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes):
        p.error("--batch-sizes must be >= 1")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    try:
        parse_sets(args.set)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_batch:
        print(json.dumps(child(args)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pa_orchestration_") as tmp:
        tmp_path = Path(tmp)
        make_empty_files(tmp_path / "images", args.files)
        model = args.model or fit_tiny_model(tmp_path / "fit")
        n = 0
        for batch in args.batch_sizes:
            for _ in range(args.repeat):
                n += 1
                r = run_child(args, batch, str(tmp_path / "images"), model, tmp_path / f"report{n}")
                runs.append(r)
                print(
                    f"batch {batch}: {r['worker_rate']:.0f} img/s per worker, cpu {r['cpu_s']:.1f} s",
                    file=sys.stderr,
                )
    result = {
        "benchmark": "orchestration",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "files": args.files,
        "model": args.model or "tiny PatchCore fitted by the benchmark",
        "sets": args.set,
        "goal_images_per_s": GOAL_IMAGES_PER_S,
        "runs": runs,
    }
    print(format_table(runs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
