"""Scheduler memory and time for planning, queueing and finishing a run of N images, and compaction.

No images and no model: the input is a fake store that lists N synthetic objects (keys like
`line03/cam1/000001234.png`, generated as they are listed), the queue is a real Redis (a private
`redis-server` on a free loopback port, started and stopped here, unless --redis-url is given: then
the run's keys are deleted at the end), and the parts a run's workers would write are written by a
step of their own (one error row per image, not measured). Steps:

    plan     prepare_plan + commit_plan: list the input, write listing.parquet and run.json
    queue    queue_plan: reconcile and push every batch into the run's Redis stream
    parts    (unmeasured) one part per batch, as workers write them
    finish   the scheduler's finish: exactly-once check, summary, review page (+ compaction)

`plan`, `queue` and `finish` run in ONE child process, the scheduler, so its peak RSS (max RSS) is the
scheduler's peak over the three; each step's wall and CPU seconds and the peak so far are reported.
`--compaction` also times compacting R rows cut into parts of P rows (a separate child).

Usage (from the repo root):
    python benchmarks/plan_scale.py --images 1000000 --out runs/plan_scale
    python benchmarks/plan_scale.py --images 10000000 --batch-size 256 --out runs/plan_scale
    python benchmarks/plan_scale.py --compaction --rows 200000 --part-rows 32 --out runs/plan_scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- the fake input


def synthetic_key(i: int) -> str:
    """Keys sort in index order: line (100k images each), camera, then a zero-padded number."""
    return f"line{i // 100_000:03d}/cam{i % 4}/{i:09d}.png"


def make_fake_store(n: int) -> Any:
    """An ObjectStore whose list() yields `n` synthetic images in key order (nothing stored)."""
    from patchaudit.store.objects import ObjectInfo, ObjectStore

    class FakeStore(ObjectStore):
        uri = "fake://archive"

        def list(self, prefix: str = "", extensions: Any = None, page_size: Any = None, on_skip: Any = None):
            # Sorted by key: the four cameras of a line interleave, so sort within each line only.
            for line in range(0, n, 100_000):
                for k in sorted(synthetic_key(i) for i in range(line, min(n, line + 100_000))):
                    yield ObjectInfo(k, 1000 + len(k), f"etag-{k[-13:-4]}", f"fake://archive/{k}")

        def uri_for(self, key: str) -> str:
            return f"fake://archive/{key}"

        def head(self, key: str) -> Any:
            raise NotImplementedError

        def open_read(self, key: str) -> Any:
            raise NotImplementedError

        def write_bytes(self, key: str, data: bytes) -> Any:
            raise NotImplementedError

        def write_file(self, key: str, local_path: Any) -> Any:
            raise NotImplementedError

        def delete(self, key: str) -> None:
            raise NotImplementedError

        def child(self, prefix: str) -> Any:
            raise NotImplementedError

    return FakeStore()


def error_rows(run_id: str, infos: list[Any]) -> Any:
    """The rows of one batch as a worker would write them (every image an error row), as Arrow."""
    import pyarrow as pa

    from patchaudit.store.reports import REPORT_SCHEMA

    n = len(infos)
    cols: dict[str, Any] = {name: pa.nulls(n, REPORT_SCHEMA.field(name).type) for name in REPORT_SCHEMA.names}
    cols.update(
        run_id=pa.array([run_id] * n, pa.string()),
        image_uri=pa.array([i.uri for i in infos], pa.string()),
        size=pa.array([i.size for i in infos], pa.int64()),
        etag=pa.array([i.etag for i in infos], pa.string()),
        model_id=pa.array(["m"] * n, pa.string()),
        threshold=pa.array([1.0] * n, pa.float64()),
        error=pa.array(["decode: zero-byte file"] * n, pa.string()),
        attempt=pa.array([0] * n, pa.int32()),
        worker=pa.array(["bench"] * n, pa.string()),
    )
    return pa.table(cols, schema=REPORT_SCHEMA)


def scored_rows(run_id: str, infos: list[Any], seed: int) -> Any:
    """Scored rows like a PatchCore run writes (scores, map statistics, peaks, timings; heatmap
    URIs for the flagged 5%), for realistic compacted sizes."""
    import numpy as np
    import pyarrow as pa

    from patchaudit.store.reports import REPORT_SCHEMA

    rng = np.random.default_rng(seed)
    n = len(infos)
    score = rng.gamma(4.0, 1.0, n)
    flag = score > np.quantile(score, 0.95) if n else np.zeros(0, bool)
    t = error_rows(run_id, infos)
    f64 = lambda a: pa.array(a, pa.float64())  # noqa: E731
    cols = {name: t[name] for name in REPORT_SCHEMA.names}
    cols.update(
        score=f64(score),
        is_anomalous=pa.array(flag, pa.bool_()),
        threshold=f64(np.full(n, 7.0)),
        map_max=f64(score * 1.1),
        map_mean=f64(rng.random(n)),
        anomalous_area_fraction=f64(np.where(flag, rng.random(n) * 0.1, 0.0)),
        peak_x=pa.array(rng.integers(0, 900, n), pa.int32()),
        peak_y=pa.array(rng.integers(0, 900, n), pa.int32()),
        heatmap_uri=pa.array(
            [f"file:///report/heatmaps/{i.key[-13:-4]}.png" if fl else None for i, fl in zip(infos, flag)]
        ),
        error=pa.nulls(n, pa.string()),
        worker=pa.array(["fw1@node-3:12345"] * n, pa.string()),
        decode_ms=f64(rng.random(n) * 20),
        feature_ms=f64(rng.random(n) * 5),
        knn_ms=f64(rng.random(n) * 5),
    )
    return pa.table(cols, schema=REPORT_SCHEMA)


# --------------------------------------------------------------------------- redis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of our own (no persistence) on a free loopback port; stopped by its pid."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH: pass --redis-url")
        self.dir = tempfile.mkdtemp(prefix="plan-scale-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        for _ in range(100):
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit("private redis-server did not answer")

    def used_memory_mb(self) -> float:
        import redis

        return round(int(redis.Redis.from_url(self.url).info("memory")["used_memory"]) / 2**20, 1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- steps (in children)


def _usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": ru.ru_utime + ru.ru_stime, "peak_mb": ru.ru_maxrss / 1024}


class Steps:
    """Times steps in this process: wall, CPU seconds, and the peak RSS reached so far."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Any) -> Any:
        u0, t0 = _usage(), time.perf_counter()
        out = fn()
        u1 = _usage()
        self.rows.append(
            {
                "step": name,
                "wall_s": round(time.perf_counter() - t0, 2),
                "cpu_s": round(u1["cpu"] - u0["cpu"], 2),
                "peak_rss_mb": round(u1["peak_mb"], 1),
            }
        )
        print(json.dumps(self.rows[-1]), file=sys.stderr, flush=True)
        return out


def step_scheduler(args: argparse.Namespace, phase: str) -> dict[str, Any]:
    """phase "plan+queue": plan and queue; phase "finish": the finish of the planned run."""
    from patchaudit.queue.connection import connect
    from patchaudit.queue.streams import BatchQueue
    from patchaudit.scheduler.plan import commit_plan, prepare_plan
    from patchaudit.store.objects import open_store

    report = open_store(str(Path(args.out) / "report"))
    src = make_fake_store(args.images)
    steps = Steps()
    if phase == "plan+queue":
        from patchaudit.scheduler.run import queue_plan

        def plan() -> Any:
            p = prepare_plan(report, src, args.run_id, args.batch_size, "m", "file:///model", "distributed")
            commit_plan(report, p)
            return p

        p = steps.run("plan", plan)
        queue = BatchQueue(connect(args.redis_url), args.run_id)
        steps.run("queue", lambda: queue_plan(queue, p, report))
        return {"steps": steps.rows, "batches": queue.progress().total}
    from patchaudit.scheduler.finish import finish_report

    p = prepare_plan(report, src, args.run_id, args.batch_size, "m", "file:///model", "distributed")  # resumed
    out = steps.run(
        "finish",
        lambda: finish_report(
            report,
            p,
            model_id="m",
            threshold=1.0,
            top_k=20,
            seconds=1.0,
            extra={"mode": "distributed"},
            images_now=0,
        ),
    )
    return {"steps": steps.rows, "rows": out["rows"], "errors": out["errors"], "compacted": _compacted(report)}


def _compacted(report: Any) -> dict[str, Any]:
    from patchaudit.store import compaction

    m = compaction.read_manifest(report) or {"files": []}
    sizes = [f["bytes"] for f in m["files"]]
    return {
        "files": len(sizes),
        "mb_total": round(sum(sizes) / 2**20, 1),
        "mb_largest": round(max(sizes, default=0) / 2**20, 1),
    }


def step_parts(args: argparse.Namespace) -> dict[str, Any]:
    """Write one part per batch (what the workers would do), from the run's listing snapshot."""
    import pyarrow.parquet as pq

    from patchaudit.store import listing as listings
    from patchaudit.store import reports
    from patchaudit.store.objects import open_store

    report = open_store(str(Path(args.out) / "report"))
    os.makedirs(Path(args.out) / "report" / "parts", exist_ok=True)
    n = 0
    with listings.local_listing(report) as path:
        buf: list[Any] = []
        for info in listings.iter_infos(path):
            buf.append(info)
            if len(buf) == args.batch_size:
                pq.write_table(error_rows(args.run_id, buf), report.root + "/" + reports.part_key(f"b{n:06d}"))
                n, buf = n + 1, []
        if buf:
            pq.write_table(error_rows(args.run_id, buf), report.root + "/" + reports.part_key(f"b{n:06d}"))
            n += 1
    return {"parts": n}


def step_compaction(args: argparse.Namespace) -> dict[str, Any]:
    """Compact `rows` scored rows in parts of `part_rows` (written first, not measured)."""
    import pyarrow.parquet as pq

    from patchaudit.store import compaction, reports
    from patchaudit.store.objects import ObjectInfo, open_store

    root = Path(args.out) / "compaction"
    shutil.rmtree(root, ignore_errors=True)
    (root / "parts").mkdir(parents=True)
    infos = [ObjectInfo(synthetic_key(i), 1000, "e", f"fake://archive/{synthetic_key(i)}") for i in range(args.rows)]
    for n, s in enumerate(range(0, args.rows, args.part_rows)):
        pq.write_table(
            scored_rows("bench", infos[s : s + args.part_rows], n),
            root / reports.part_key(f"b{n:06d}"),
            compression="zstd",
        )
    del infos
    store = open_store(str(root))
    parts_mb = sum(f.stat().st_size for f in (root / "parts").iterdir()) / 2**20
    steps = Steps()
    steps.run("read_report from the parts", lambda: reports.read_report(store).num_rows)
    m = steps.run("compact", lambda: compaction.compact(store))
    steps.run("compact again (no-op)", lambda: compaction.compact(store))
    t = steps.run("read_report from the compacted files", lambda: reports.read_report(store))
    return {
        "steps": steps.rows,
        "rows": m["rows"],
        "parts": len(m["covered"]),
        "parts_mb": round(parts_mb, 1),
        "read_rows": t.num_rows,
        **_compacted(store),
    }


# --------------------------------------------------------------------------- driver


def _child(step: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--out", args.out, *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {step} failed:\n{out}")
    res = json.loads(out.strip().splitlines()[-1])
    res.update(
        child=step,
        wall_s=round(wall, 2),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
        peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
    )
    print(json.dumps(res), flush=True)
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1_000_000, help="images the fake input lists")
    ap.add_argument("--batch-size", type=int, default=32, help="run.batch_size (images per part)")
    ap.add_argument("--out", default="runs/plan_scale", help="scratch folder (the report is written here)")
    ap.add_argument(
        "--redis-url",
        default="",
        help="use this Redis (the run's keys are deleted after); default: a private redis-server",
    )
    ap.add_argument("--compaction", action="store_true", help="time compaction instead (--rows, --part-rows)")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--part-rows", type=int, default=32)
    ap.add_argument("--run-id", default="plan-scale")
    ap.add_argument("--step", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.rows < 1 or args.part_rows < 1:
        raise SystemExit("--images, --batch-size, --rows and --part-rows must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        if args.step == "parts":
            res = step_parts(args)
        elif args.step == "compaction":
            res = step_compaction(args)
        else:
            res = step_scheduler(args, args.step)
        print(json.dumps(res))
        return 0
    os.makedirs(args.out, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.compaction:
        res = _child("compaction", args, ["--rows", str(args.rows), "--part-rows", str(args.part_rows)])
        result = {"machine": machine, "compaction": res}
    else:
        shutil.rmtree(Path(args.out) / "report", ignore_errors=True)
        own = None if args.redis_url else PrivateRedis()
        url = args.redis_url or (own.url if own else "")
        common = ["--images", str(args.images), "--batch-size", str(args.batch_size), "--run-id", args.run_id]
        try:
            planned = _child("plan+queue", args, [*common, "--redis-url", url])
            redis_mb = own.used_memory_mb() if own else None
            parts = _child("parts", args, common)
            finished = _child("finish", args, common)
        finally:
            if own:
                own.stop()
            else:
                import redis

                from patchaudit.queue.streams import BatchQueue

                BatchQueue(redis.Redis.from_url(url), args.run_id).delete()
        result = {
            "machine": machine,
            "images": args.images,
            "batch_size": args.batch_size,
            "scheduler_peak_rss_mb": max(planned["peak_rss_mb"], finished["peak_rss_mb"]),
            "redis_used_memory_mb": redis_mb,
            "plan_queue": planned,
            "parts": parts,
            "finish": finished,
        }
    name = "compaction.json" if args.compaction else f"plan_scale_{args.images}.json"
    Path(args.out, name).write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {k: v for k, v in result.items() if k in ("images", "scheduler_peak_rss_mb", "redis_used_memory_mb")}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
