"""Mining at archive scale: `diff` of two synthetic 1,000,000-row reports, and the `similar` index
(exact and IVF) built over one of them and queried. Not a timed test: a benchmark, run once.

The reports have the real schema and embeddings (benchmarks/synthetic_reports.py; 152-dimensional
float16 pooled and peak vectors, the default PatchCore backbone's size), cut into parts of
--part-rows rows (a run writes one part per batch: run.batch_size, 32 by default).

Each step runs in a child process of its own, so its wall time, CPU time and peak memory (max RSS)
are its own. Usage:
    python benchmarks/archive_scale.py --rows 1000000 --out runs/archive_scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(step: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    """Run one step in a child; returns its JSON result plus wall, CPU seconds and peak RSS."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--step",
        step,
        "--rows",
        str(args.rows),
        "--out",
        args.out,
        "--part-rows",
        str(args.part_rows),
        *(extra or []),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read()
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {step} failed:\n{out}")
    res = json.loads(out.strip().splitlines()[-1])
    res.update(
        step=step,
        wall_s=round(wall, 2),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
        peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
    )
    print(json.dumps(res), flush=True)
    return res


def _paths(args: argparse.Namespace) -> tuple[str, str]:
    return os.path.join(args.out, "old"), os.path.join(args.out, "new")


def step(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE))
    old, new = _paths(args)
    if args.step == "generate":
        from synthetic_reports import Synthetic, write_report

        for path, cfg in (
            (old, Synthetic(args.rows, seed=0, batch_size=args.part_rows, errors_every=997)),
            # diff reads only the parts: the new report goes without embeddings (half the writing)
            (
                new,
                Synthetic(
                    args.rows,
                    seed=1,
                    batch_size=args.part_rows,
                    start=args.rows // 100,
                    changed_etag_every=500,
                    model_id="patchcore-synthetic-v2",
                    embeddings=False,
                ),
            ),
        ):
            if args.only and not path.endswith(args.only):
                continue
            if not os.path.exists(os.path.join(path, "run.json")):
                write_report(path, cfg)
        return {"parts_per_report": -(-args.rows // args.part_rows)}
    if args.step == "diff":
        from patchaudit.mining.diff import compute_diff, write_diff
        from patchaudit.mining.reportio import open_report
        from patchaudit.store.objects import open_store

        res = compute_diff(open_report(old), open_report(new))
        write_diff(open_store(os.path.join(args.out, "diff")), res)
        s = res.summary
        return {
            k: s[k] for k in ("matched", "newly_flagged", "cleared", "only_old", "only_new", "etag_changed", "spearman")
        }
    if args.step in ("index_exact", "index_ivf"):
        from patchaudit.mining import similar as sim
        from patchaudit.mining.reportio import open_report

        exact_max = sim.EXACT_MAX if args.step == "index_exact" else 0
        t0 = time.perf_counter()
        ri = sim.load_or_build(open_report(old), "pooled", exact_max=exact_max, cache=args.step == "index_exact")
        return {"vectors": len(ri), "exact": ri.exact, "build_s": round(time.perf_counter() - t0, 2)}
    if args.step == "query":
        # a fresh process: open the report, load the cached exact index, one query by an archived image's URI
        from patchaudit.mining import similar as sim
        from patchaudit.mining.reportio import open_report

        t0 = time.perf_counter()
        rep = open_report(old)
        ri = sim.load_or_build(rep, "pooled")
        t1 = time.perf_counter()
        uri = ri.rows["image_uri"][12345].as_py()
        vec = sim.find_vector([ri], [rep], uri, "pooled")
        t2 = time.perf_counter()
        hits = sim.search([ri], vec, 20, exclude_uri=uri)
        t3 = time.perf_counter()
        return {
            "load_s": round(t1 - t0, 2),
            "lookup_s": round(t2 - t1, 3),
            "search_s": round(t3 - t2, 3),
            "hits": len(hits),
        }
    if args.step == "ivf_recall":
        import numpy as np

        from patchaudit.mining import similar as sim
        from patchaudit.store.embeddings import read_embeddings
        from patchaudit.store.objects import open_store

        emb = read_embeddings(open_store(old))
        x = emb.pooled
        t0 = time.perf_counter()
        ivf, exact = sim.build_index(x, exact_max=0)
        build = time.perf_counter() - t0
        flat, _ = sim.build_index(x)
        rng = np.random.default_rng(0)
        q = x[rng.choice(len(x), 200, replace=False)].astype(np.float32)
        t1 = time.perf_counter()
        _, i_ivf = ivf.search(q, 10)
        t_ivf = (time.perf_counter() - t1) / len(q)
        t2 = time.perf_counter()
        _, i_flat = flat.search(q, 10)
        t_flat = (time.perf_counter() - t2) / len(q)
        # Recall of ids against the exact top 10. The synthetic vectors sit in 8 groups of ~125,000 equally
        # noisy points, so a top 10 is a handful of near ties among thousands: this measures speed and
        # tie-breaking more than quality (IVF recall on real embeddings is to be measured on real archives).
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_ivf, i_flat)]))
        return {
            "ivf_build_s": round(build, 2),
            "ivf_query_ms": round(t_ivf * 1e3, 2),
            "flat_query_ms": round(t_flat * 1e3, 2),
            "recall_at_10_ids": round(recall, 4),
            "nlist": int(ivf.nlist),
            "nprobe": int(ivf.nprobe),
        }
    raise SystemExit(f"unknown step {args.step}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--part-rows", type=int, default=1000)
    ap.add_argument("--out", default="runs/archive_scale")
    ap.add_argument("--step")
    ap.add_argument("--only", help="generate: only the report named so (old or new)")
    ap.add_argument("--steps", default="generate,diff,index_exact,query,ivf_recall")
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step(args)))
        return
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "rows": args.rows,
        "part_rows": args.part_rows,
        "steps": [],
    }
    for name in args.steps.split(","):
        results["steps"].append(_child(name, args))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print("| step | wall s | CPU s | peak RSS MB | result |")
    print("|---|---|---|---|---|")
    for r in results["steps"]:
        rest = {k: v for k, v in r.items() if k not in ("step", "wall_s", "cpu_s", "peak_rss_mb")}
        print(f"| {r['step']} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mb']} | {json.dumps(rest)} |")


if __name__ == "__main__":
    main()
