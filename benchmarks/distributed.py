"""Distributed scoring (local Ray + Redis, file:// store) vs the single-process scorer, same images.

    python benchmarks/distributed.py [--data DIR] [--model URI] [--config YAML] [--repeat 3]
                                     [--workers 1 2] [--heatmaps off on] [--batch-size N]
                                     [--out results.json]

The input is the category's test images repeated `--repeat` times (hard links in a temp folder, so a
run lasts long enough to measure; links, not symlinks: the file store refuses links leaving its root).
Without `--model`, a model is fitted first with the config. Every measurement runs in a child process
of this script, so each run starts cold (its own model load, its own Ray) and nothing leaks between runs.

Throughput, three ways (images/s):
- `incl_startup`: all images / wall time from the call to the last report part (Ray start, actors,
  model load included);
- `excl_ray_init`: the same without `ray.init` (the distributed run still pays actor start-up);
- `steady`: from the report parts' write times. Per worker (the report's `worker` column), the images
  of its parts after its first one, over the time from its first part to its last; summed over workers.
  Start-up and the first (warm-up) batch are left out, so this is what a long run sustains.
Overhead = 1 - steady(distributed) / steady(single process), per heatmap setting. On a shared machine
wall time mostly measures who gets the cores, so CPU time is measured too: user + system seconds of
the run's process and all its descendants (Ray's daemons and actors included), sampled from /proc,
per image between the first and the last part; `cpu_overhead` = dist / single - 1.
Stage times (decode, features, k-NN per image) come from the report rows; in the distributed run the
k-NN time includes the round trip to the index-shard actor. Each distributed run's scores are compared
with the single-process run's (`max_abs_score_diff_vs_single`): same images, model and exact search.
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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(1, str(Path(__file__).resolve().parent))  # sibling scripts: proc_cpu
from proc_cpu import process_tree  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = os.path.join("..", "shared", "data", "mvtec_ad", "bottle")
DEFAULT_CONFIG = os.path.join("configs", "default.yaml")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TARGET_OVERHEAD = 0.15


# --------------------------------------------------------------------------- pure helpers


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def steady_throughput(parts: Sequence[tuple[str, float, int]]) -> dict[str, Any]:
    """Sustained images/s from (worker, write time s, images) per report part.

    Each worker's first part (model warm-up, pipeline fill) is left out; a worker with one part
    gives no rate. Returns the summed rate and the per-worker rates.
    """
    by_worker: dict[str, list[tuple[float, int]]] = {}
    for worker, t, n in parts:
        by_worker.setdefault(worker, []).append((t, n))
    rates: dict[str, float] = {}
    for worker, items in sorted(by_worker.items()):
        items.sort()
        span = items[-1][0] - items[0][0]
        if len(items) >= 2 and span > 0:
            rates[worker] = sum(n for _, n in items[1:]) / span
    return {"images_per_s": sum(rates.values()) if rates else None, "per_worker": rates, "workers_seen": len(by_worker)}


def overhead(dist_rate: float | None, single_rate: float | None) -> float | None:
    """Share of the single-process throughput lost by the distributed path (negative: it is faster)."""
    if not dist_rate or not single_rate:
        return None
    return 1.0 - dist_rate / single_rate


def repeat_images(src_dir: Path, dst_dir: Path, repeat: int) -> int:
    """Link every image under `src_dir` into `dst_dir` `repeat` times (distinct names); returns the count."""
    if repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {repeat}")
    files = sorted(p for p in src_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {src_dir}")
    dst_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for r in range(repeat):
        for f in files:
            rel = "_".join(f.relative_to(src_dir).parts)
            dst = dst_dir / f"r{r}_{rel}"
            try:
                os.link(f, dst)
            except OSError:  # another filesystem: copy
                dst.write_bytes(f.read_bytes())
            n += 1
    return n


def format_table(runs: Iterable[dict[str, Any]]) -> str:
    head = (
        f"{'mode':<12} {'workers':>7} {'heatmaps':>8} {'images':>6} {'steady/s':>9} {'excl_init/s':>11} "
        f"{'incl_all/s':>10} {'ray_init_s':>10} {'1st_part_s':>10} {'decode_ms':>9} {'feat_ms':>8} "
        f"{'knn_ms':>8} {'overhead':>8} {'cpu_ms/img':>10} {'cpu_ovh':>8} {'load':>5}"
    )
    lines = [head, "-" * len(head)]

    def f(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    for r in runs:
        st = r.get("stages", {})
        cpu = r.get("cpu", {}).get("steady_s_per_image")
        cpu_ms = None if cpu is None else cpu * 1e3
        lines.append(
            f"{r['mode']:<12} {r.get('workers', 1):>7} {('on' if r['heatmaps'] else 'off'):>8} {r['images']:>6} "
            f"{f(r['steady']['images_per_s'], '.2f'):>9} {f(r['throughput']['excl_ray_init'], '.2f'):>11} "
            f"{f(r['throughput']['incl_startup'], '.2f'):>10} {f(r.get('ray_init_s'), '.1f'):>10} "
            f"{f(r['first_part_s'], '.1f'):>10} {f(st.get('decode_ms'), '.1f'):>9} {f(st.get('feature_ms'), '.1f'):>8} "
            f"{f(st.get('knn_ms'), '.1f'):>8} {f(r.get('overhead'), '+.1%'):>8} {f(cpu_ms, '.0f'):>10} "
            f"{f(r.get('cpu_overhead'), '+.1%'):>8} {r['load_before'][0]:>5.1f}"
        )
    return "\n".join(lines)


def cpu_between(series: Sequence[tuple[float, float]], t0: float, t1: float) -> float | None:
    """CPU seconds used between wall times t0 and t1, linearly interpolated in a (time, cpu total) series."""
    if len(series) < 2 or t1 <= t0:
        return None
    ts = [t for t, _ in series]
    cs = [c for _, c in series]

    def at(t: float) -> float:
        if t <= ts[0]:
            return cs[0]
        for i in range(1, len(ts)):
            if t <= ts[i]:
                w = (t - ts[i - 1]) / (ts[i] - ts[i - 1]) if ts[i] > ts[i - 1] else 1.0
                return cs[i - 1] + w * (cs[i] - cs[i - 1])
        return cs[-1]

    return at(t1) - at(t0)


class CpuSampler:
    """CPU seconds (user + system) of this process and all its descendants (Ray's included), from /proc.

    A thread samples every `interval` seconds and keeps a (wall time, total) series; CPU time is far
    less sensitive than wall time to other jobs on a shared machine. Linux only (elsewhere: no series).
    """

    def __init__(self, interval: float = 0.25) -> None:
        import threading

        self.interval = interval
        self.series: list[tuple[float, float]] = []
        self._seen: dict[tuple[int, str], float] = {}  # (pid, start time) -> latest CPU seconds
        self._base: dict[tuple[int, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> dict[tuple[int, str], float]:
        return {(pid, start): cpu for pid, (start, cpu) in process_tree(os.getpid()).items()}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        now = self._read()
        for key, cpu in now.items():
            self._base.setdefault(key, cpu if not self.series else 0.0)  # new processes count from zero
            self._seen[key] = cpu
        self.series.append((time.time(), sum(self._seen[k] - self._base[k] for k in self._seen)))

    def start(self) -> CpuSampler:
        if os.path.isdir("/proc"):
            self.sample()
            self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.sample()
        return self.series


# --------------------------------------------------------------------------- child runs


def _config(config_path: str, heatmaps: bool, workers: int, batch_size: int | None):
    from patchaudit.scheduler.config import Config, load_config

    cfg = load_config(config_path)
    changes: dict[str, Any] = {"heatmaps": heatmaps, "feature_workers": workers}
    if batch_size:
        changes["batch_size"] = batch_size
    return Config(model=cfg.model, run=dataclasses.replace(cfg.run, **changes).validate())


def _report_facts(report_dir: Path, started: float) -> dict[str, Any]:
    """Part write times, steady throughput and mean stage times from a finished report."""
    import pyarrow.parquet as pq

    parts, decode, feat, knn = [], [], [], []
    for p in sorted((report_dir / "parts").glob("*.parquet")):
        t = pq.read_table(p, columns=["worker", "decode_ms", "feature_ms", "knn_ms", "error"]).to_pylist()
        parts.append((t[0]["worker"], p.stat().st_mtime, len(t)))
        for row in t:
            if row["error"] is None:
                decode.append(row["decode_ms"])
                feat.append(row["feature_ms"])
                knn.append(row["knn_ms"] or 0.0)
    first = min(t for _, t, _ in parts)
    last = max(t for _, t, _ in parts)

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "parts": len(parts),
        "first_part_s": first - started,
        "last_part_s": last - started,
        "steady": steady_throughput(parts),
        "part_times": sorted((t, n) for _, t, n in parts),
        "stages": {"decode_ms": mean(decode), "feature_ms": mean(feat), "knn_ms": mean(knn)},
    }


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measured run in this (fresh) process; prints nothing but the JSON result."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
    cfg = _config(args.config, args.child_heatmaps, args.child_workers, args.batch_size)
    report_dir = Path(args.child_report)
    out: dict[str, Any] = {
        "mode": args.child,
        "heatmaps": args.child_heatmaps,
        "load_before": load_avg(),
        "batch_size": cfg.run.batch_size,
        "decode_threads": cfg.run.decode_threads,
    }
    sampler = CpuSampler().start()
    started = time.time()
    if args.child == "single":
        from patchaudit.scheduler.local import score_single

        summary = score_single(cfg, args.images, args.model, str(report_dir), None)
        wall = time.time() - started
        out.update(workers=1, ray_init_s=None, wall_s=wall, run_s=summary["seconds"])
    else:
        import ray
        import redis

        from patchaudit.queue.streams import BatchQueue
        from patchaudit.scheduler import run as srun
        from patchaudit.scheduler.local_redis import ensure_redis

        srun._ensure_ray()  # the same local Ray run_score starts; started here to time it apart
        ray_init = time.time() - started
        try:
            summary = srun.run_score(
                cfg, args.images, args.model, str(report_dir), workers=args.child_workers, progress=False
            )
        finally:
            ray.shutdown()
        wall = time.time() - started
        with ensure_redis(cfg.run.redis_url) as handle:  # leave no run keys behind in a shared Redis
            BatchQueue(redis.Redis.from_url(handle.url), summary["run_id"]).delete()
        out.update(
            workers=args.child_workers,
            ray_init_s=ray_init,
            wall_s=wall,
            run_s=summary["seconds"],
            worker_stats=summary.get("workers"),
            shards=summary.get("shards"),
        )
    series = sampler.stop()
    n = int(summary["rows"])
    facts = _report_facts(report_dir, started)
    times = facts.pop("part_times")
    steady_cpu = cpu_between(series, times[0][0], times[-1][0])
    later = sum(k for _, k in times[1:])
    facts["cpu"] = {
        "total_s": series[-1][1] if series else None,  # this process and every descendant, start-up included
        "steady_s_per_image": steady_cpu / later if steady_cpu is not None and later else None,
    }
    # Up to the last part: the run's own finishing work (summary, Ray shutdown) is the same for both modes.
    excl_init_s = facts["last_part_s"] - (out["ray_init_s"] or 0.0)
    out.update(
        images=n,
        scored=int(summary["scored"]),
        errors=int(summary["errors"]),
        load_after=load_avg(),
        **facts,
        throughput={"incl_startup": n / facts["last_part_s"], "excl_ray_init": n / excl_init_s},
    )
    return out


def report_scores(report_dir: Path) -> dict[str, float]:
    """image URI -> score of a finished report (scored rows only)."""
    import pyarrow.parquet as pq

    out: dict[str, float] = {}
    for p in (report_dir / "parts").glob("*.parquet"):
        for row in pq.read_table(p, columns=["image_uri", "score", "error"]).to_pylist():
            if row["error"] is None:
                out[row["image_uri"]] = row["score"]
    return out


def max_score_diff(a: dict[str, float], b: dict[str, float]) -> float | None:
    """Max |a - b| per image; None unless both hold the same, non-empty set of images."""
    if not a or a.keys() != b.keys():
        return None
    return max(abs(a[k] - b[k]) for k in a)


def run_child(
    args: argparse.Namespace, mode: str, workers: int, heatmaps: bool, images: str, model: str, report_dir: Path
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        mode,
        "--child-workers",
        str(workers),
        "--child-report",
        str(report_dir),
        "--images",
        images,
        "--model",
        model,
        "--config",
        args.config,
    ]
    if heatmaps:
        cmd.append("--child-heatmaps")
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    env.update(kv.split("=", 1) for kv in args.env)  # reaches Ray's processes too: ray.init starts them from here
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run (workers={workers}, heatmaps={heatmaps}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="an MVTec-style category (its test/ images are scored)")
    p.add_argument("--model", default=None, help="a fitted model URI; default: fit one with --config first")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--repeat", type=int, default=3, help="times the test images are repeated")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="feature worker counts to measure")
    p.add_argument("--heatmaps", choices=["off", "on"], nargs="+", default=["off", "on"])
    p.add_argument("--batch-size", type=int, default=None, help="images per queue message / report part")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the measured runs, e.g. OMP_WAIT_POLICY=PASSIVE (repeatable)",
    )
    p.add_argument("--out", default="distributed_results.json")
    p.add_argument("--images", default=None, help=argparse.SUPPRESS)  # child only
    p.add_argument("--child", choices=["single", "dist"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child-heatmaps", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-report", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bad = [kv for kv in args.env if "=" not in kv or not kv.split("=", 1)[0]]
    if bad:
        print(f"error: --env takes KEY=VALUE, got {bad[0]!r}", file=sys.stderr)
        return 2
    data = Path(args.data)
    if not (data / "test").is_dir():
        print(f"error: {data} has no test/ folder (expected an MVTec-style category)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pa_dist_bench_") as tmp:
        tmp_path = Path(tmp)
        n_images = repeat_images(data / "test", tmp_path / "images", args.repeat)
        for f in (tmp_path / "images").iterdir():  # page cache: no run pays the first disk read
            f.read_bytes()
        model = args.model
        fit_info = None
        if model is None:
            from patchaudit.scheduler.config import load_config
            from patchaudit.scheduler.local import fit

            model = str(tmp_path / "model")
            t0 = time.perf_counter()
            fit_info = fit(load_config(args.config), str(data), model)
            fit_info = {"seconds": time.perf_counter() - t0, "model_id": fit_info["model_id"]}
        runs = []
        n = 0
        for hm in args.heatmaps:
            heat = hm == "on"
            plan = [("single", 1)] + [("dist", w) for w in args.workers]
            single_rate = single_cpu = None
            single_scores: dict[str, float] = {}
            for mode, w in plan:
                n += 1
                r = run_child(args, mode, w, heat, str(tmp_path / "images"), model, tmp_path / f"report{n}")
                cpu = r["cpu"]["steady_s_per_image"]
                scores = report_scores(tmp_path / f"report{n}")
                if mode == "single":
                    single_rate, single_cpu, single_scores = r["steady"]["images_per_s"], cpu, scores
                else:
                    # same images, same model, exact search: the scores must agree (up to float summation order)
                    r["max_abs_score_diff_vs_single"] = max_score_diff(scores, single_scores)
                    r["overhead"] = overhead(r["steady"]["images_per_s"], single_rate)
                    # CPU seconds per image: dist / single - 1 (insensitive to the machine's other load)
                    r["cpu_overhead"] = cpu / single_cpu - 1.0 if cpu and single_cpu else None
                runs.append(r)
                print(
                    f"{mode} workers={w} heatmaps={hm}: steady {r['steady']['images_per_s']} img/s "
                    f"(load {r['load_before'][0]})",
                    file=sys.stderr,
                )
    result = {
        "benchmark": "distributed",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "data": str(data),
        "repeat": args.repeat,
        "images": n_images,
        "config": args.config,
        "model": args.model or "fitted by the benchmark",
        "fit": fit_info,
        "env": args.env,
        "target_overhead": TARGET_OVERHEAD,
        "runs": runs,
    }
    print(format_table(runs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no runs/
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
