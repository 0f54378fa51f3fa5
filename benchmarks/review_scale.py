"""The audit's ledger check and the review page at archive scale, on a synthetic report.

Builds a report of N rows (default 1,000,000) with the real schema (store.reports.REPORT_SCHEMA: 1%
error rows, 1,000 folders, heatmap URIs for flagged images) in 100 parts, and a line's ledger of the
same N images in 30 nightly parts. Then, each step in a fresh process so its peak memory is its own:

- ledger: read the whole ledger and anti-join a listing of the N images (1% with a changed etag,
  plus 1% new ones): the check `patchaudit audit` does before it plans a pass;
- review: draw the report's index.html from its parts (read, histogram, per-folder flag rates, top
  flagged, errors).

Prints a table (wall seconds, CPU seconds, peak RSS) and writes it as JSON with --out.

    python benchmarks/review_scale.py --rows 1000000 --work /tmp/review_scale --out runs/bench/review_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa

PARTS = 100
LEDGER_PARTS = 30
FOLDERS = 1000


def _uris(n: int, start: int = 0) -> pa.Array:
    i = np.arange(start, start + n)
    folder = (i % FOLDERS).astype(str)
    name = np.char.zfill(i.astype(str), 9)
    return pa.array(
        np.char.add(
            np.char.add(np.char.add("s3://archive/line-7/2026/11/f", folder), "/img"), np.char.add(name, ".png")
        ).tolist(),
        pa.string(),
    )


def generate(work: str, rows: int) -> None:
    from patchaudit.store import ledger, reports
    from patchaudit.store.objects import open_store

    rng = np.random.default_rng(0)
    report = open_store(os.path.join(work, "report"))
    per = -(-rows // PARTS)
    for p in range(PARTS):
        lo, hi = p * per, min(rows, (p + 1) * per)
        n = hi - lo
        if n <= 0:
            break
        uris = _uris(n, lo)
        score = rng.gamma(4.0, 5.0, n)
        err = rng.random(n) < 0.01
        flag = (score >= 35.0) & ~err
        heat = np.where(
            flag,
            np.char.add("s3://archive/reports/line-7/heatmaps/", np.char.add(np.arange(lo, hi).astype(str), ".png")),
            None,
        )
        t = pa.table(
            {
                "run_id": pa.array(["bench"] * n),
                "image_uri": uris,
                "size": pa.array(rng.integers(1e5, 1e6, n)),
                "etag": pa.array(np.char.add("e", np.arange(lo, hi).astype(str)).tolist()),
                "model_id": pa.array(["model-a"] * n),
                "score": pa.array(np.where(err, np.nan, score), mask=err),
                "is_anomalous": pa.array(flag, mask=err),
                "threshold": pa.array(np.full(n, 35.0)),
                "map_max": pa.array(score, mask=err),
                "map_mean": pa.array(score / 3, mask=err),
                "anomalous_area_fraction": pa.array(np.where(flag, rng.random(n) * 0.2, 0.0), mask=err),
                "peak_x": pa.array(rng.integers(0, 256, n).astype(np.int32), mask=err),
                "peak_y": pa.array(rng.integers(0, 256, n).astype(np.int32), mask=err),
                "heatmap_uri": pa.array(heat.tolist(), pa.string()),
                "error": pa.array(np.where(err, "decode: truncated PNG", None).tolist(), pa.string()),
                "attempt": pa.array(np.ones(n, np.int32)),
                "worker": pa.array(["fw1"] * n),
                "decode_ms": pa.array(rng.random(n) * 20),
                "feature_ms": pa.array(rng.random(n) * 5, mask=err),
                "knn_ms": pa.array(rng.random(n) * 3, mask=err),
            },
            schema=reports.REPORT_SCHEMA,
        )
        report.write_bytes(reports.part_key(f"b{p:06d}"), reports._to_parquet(t))
    reports.write_summary(
        report,
        {
            "run_id": "bench",
            "input_uri": "s3://archive/line-7/2026/11",
            "threshold": 35.0,
            "model_id": "model-a",
            "images_listed": rows,
        },
    )
    root = open_store(os.path.join(work, "line"))
    per = -(-rows // LEDGER_PARTS)
    for p in range(LEDGER_PARTS):
        lo, hi = p * per, min(rows, (p + 1) * per)
        n = hi - lo
        if n <= 0:
            break
        name = ledger.pass_name(f"2026-11-{p + 1:02d}", 1)
        ledger.write_part(
            root,
            name,
            pa.table(
                {
                    "image_uri": _uris(n, lo),
                    "etag": pa.array(np.char.add("e", np.arange(lo, hi).astype(str)).tolist()),
                    "model_id": pa.array(["model-a"] * n),
                    "pass": pa.array([name] * n),
                    "error": pa.array(np.zeros(n, bool)),
                },
                schema=ledger.LEDGER_SCHEMA,
            ),
        )


def step_ledger(work: str, rows: int) -> dict:
    from patchaudit.store import ledger
    from patchaudit.store.objects import ObjectInfo, open_store

    uris = _uris(rows + rows // 100).to_pylist()
    changed = set(range(0, rows, 100))
    infos = [
        ObjectInfo(u[len("s3://archive/") :], 1, f"e{i}" if i not in changed else f"x{i}", u)
        for i, u in enumerate(uris)
    ]  # what store.list yields for the night
    t0, c0 = time.perf_counter(), time.process_time()
    table = ledger.read_ledger(open_store(os.path.join(work, "line")), "model-a")
    todo = ledger.unscored(infos, table)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "ledger_rows": table.num_rows,
        "listed": len(infos),
        "to_score": len(todo),
        "expected": len(changed) + rows // 100,
    }


def step_review(work: str, rows: int) -> dict:
    from patchaudit.review.page import write_review_page
    from patchaudit.store.objects import open_store

    t0, c0 = time.perf_counter(), time.process_time()
    uri = write_review_page(open_store(os.path.join(work, "report")))
    size = os.path.getsize(os.path.join(work, "report", "index.html"))
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "page": uri,
        "page_bytes": size,
    }


def _child(step: str, work: str, rows: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--step", step, "--work", work, "--rows", str(rows)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--work", default="runs/bench/review_scale")
    ap.add_argument("--out")
    ap.add_argument("--step", choices=("generate", "ledger", "review"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        t0 = time.perf_counter()
        res = {
            "generate": lambda: generate(args.work, args.rows) or {},
            "ledger": lambda: step_ledger(args.work, args.rows),
            "review": lambda: step_review(args.work, args.rows),
        }[args.step]()
        res.setdefault("seconds", time.perf_counter() - t0)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    results = {
        "rows": args.rows,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "generate": _child("generate", args.work, args.rows),
    }
    for step in ("ledger", "review"):
        results[step] = _child(step, args.work, args.rows)
    print(f"{'step':<8} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>12}  notes")
    for step in ("ledger", "review"):
        r = results[step]
        note = (
            f"{r['ledger_rows']:,} ledger rows, {r['listed']:,} listed, {r['to_score']:,} to score "
            f"(expected {r['expected']:,})"
            if step == "ledger"
            else f"index.html {r['page_bytes']:,} bytes"
        )
        print(f"{step:<8} {r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f} {r['peak_rss_mb']:>12.0f}  {note}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
