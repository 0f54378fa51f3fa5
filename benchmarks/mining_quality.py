"""Measured quality of dataset mining on labelled data (MVTec AD bottle, magnetic tile), nothing tuned on it.

For each category: fit the default PatchCore on train/good (held-out calibration as `patchaudit fit`
does), score test/ with `patchaudit score --single-process` (embeddings on, the default), then
  similar: over every anomalous test image as the query, the share of its k nearest other test
           images (good ones included) that have the same defect type: mean precision@5 and @10, for
           the pooled and the peak embedding, against the random baseline (the expected precision
           of k images drawn at random: (n_type - 1) / (N - 1), averaged over the queries);
  cluster: the adjusted Rand index of `patchaudit cluster`'s clusters against the defect types,
           K = the number of defect types, (a) on the flagged images (the command's default; good
           images flagged by mistake form their own label) and (b) on all truly defective images.
For bottle also: `patchaudit diff` between the PatchCore report and a PaDiM report of the same images.

Labels (the folder names) are used for these metrics only. Usage:
    python benchmarks/mining_quality.py --data ../shared/data --out runs/mining_quality
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

CATEGORIES = {"bottle": "mvtec_ad/bottle", "magnetic_tile": "magnetic_tile/magnetic_tile"}
PADIM = {
    "model": {"method": "padim", "backbone": "tf_efficientnet_lite0", "layers": [1, 2, 3], "image_size": [256, 256]}
}


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert & Arabie's adjusted Rand index of two labelings (1 = identical partitions, ~0 = chance)."""
    from scipy.special import comb

    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    pairs = comb(table, 2).sum()
    rows, cols, total = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum(), comb(len(a), 2)
    expected = rows * cols / total
    top = 0.5 * (rows + cols) - expected
    return float((pairs - expected) / top) if top else 1.0


def defect_type(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 2)[-2]


def precision_at(vectors: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Mean precision@k of the same label over anomalous queries (label != good), exact cosine k-NN."""
    x = vectors.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T  # (N, N); N is a few hundred
    np.fill_diagonal(sims, -np.inf)
    queries = np.flatnonzero(labels != "good")
    out = {}
    order = np.argsort(-sims[queries], axis=1, kind="stable")
    for k in ks:
        same = labels[order[:, :k]] == labels[queries, None]
        out[f"p@{k}"] = float(same.mean())
    n = len(labels)
    counts = {t: int((labels == t).sum()) for t in set(labels)}
    out["random"] = float(np.mean([(counts[labels[q]] - 1) / (n - 1) for q in queries]))
    return out


def ensure_model(config_data: dict | None, data: str, out: Path) -> str:
    from patchaudit.scheduler import local
    from patchaudit.scheduler.config import config_from_dict

    if (out / "manifest.json").is_file():
        return str(out)
    local.fit(config_from_dict(config_data or {}), data, str(out))
    return str(out)


def ensure_report(model: str, data: str, out: Path) -> tuple[str, float]:
    from patchaudit.scheduler import local
    from patchaudit.scheduler.config import Config

    if (out / "_SUCCESS").is_file():
        return str(out), float("nan")
    t0 = time.perf_counter()
    local.score_single(Config(), os.path.join(data, "test"), model, str(out), None)
    return str(out), time.perf_counter() - t0


def fit_subset(data: str, out: Path, n: int, seed: int = 0) -> str:
    """A copy of `data` with `n` seeded train/good images (and test/ linked), for a quicker fit."""
    import shutil

    root = out / "fit_subset"
    good = sorted(p for p in Path(data, "train", "good").iterdir() if p.is_file())
    pick = np.random.default_rng(seed).choice(len(good), min(n, len(good)), replace=False)
    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    for i in sorted(pick):
        shutil.copy(good[i], root / "train" / "good" / good[i].name)
    return str(root)


def evaluate_category(name: str, data: str, out: Path, fit_images: int = 0, coreset: float | None = None) -> dict:
    from patchaudit.mining.cluster import kmeans
    from patchaudit.mining.reportio import open_report, read_columns
    from patchaudit.store.embeddings import read_embeddings

    cfg = {"model": {"patchcore": {"coreset_ratio": coreset}}} if coreset else None
    model = ensure_model(cfg, fit_subset(data, out, fit_images) if fit_images else data, out / "model_patchcore")
    report_uri, score_s = ensure_report(model, data, out / "report_patchcore")
    rep = open_report(report_uri)
    emb = read_embeddings(rep.store)
    labels = np.array([defect_type(u) for u in emb.uris])
    rows = {r["image_uri"]: r for r in read_columns(rep, ["image_uri", "is_anomalous"]).to_pylist()}
    flagged = np.array([bool(rows[u]["is_anomalous"]) for u in emb.uris])
    types = sorted(set(labels) - {"good"})
    res: dict = {
        "fit_images": fit_images or "all",
        "coreset_ratio": coreset or 0.1,
        "images": len(labels),
        "defect_types": types,
        "anomalous": int((labels != "good").sum()),
        "flagged": int(flagged.sum()),
        "embedding_dim": int(emb.pooled.shape[1]),
        "space": emb.space,
        "score_seconds": score_s,
        "similar": {},
        "cluster": {},
    }
    for kind in ("pooled", "peak"):
        vecs = emb.pooled if kind == "pooled" else emb.peak
        res["similar"][kind] = precision_at(vecs, labels, (5, 10))
        k = len(types)
        c_flag, _ = kmeans(vecs[flagged].astype(np.float32), k, seed=0)
        bad = labels != "good"
        c_bad, _ = kmeans(vecs[bad].astype(np.float32), k, seed=0)
        res["cluster"][kind] = {
            "k": k,
            "ari_flagged": adjusted_rand_index(c_flag, labels[flagged]),
            "ari_defective": adjusted_rand_index(c_bad, labels[bad]),
        }
    return res


def padim_diff(data: str, out: Path) -> dict:
    from patchaudit.mining.diff import compute_diff
    from patchaudit.mining.reportio import open_report

    model = ensure_model(PADIM, data, out / "model_padim")
    padim_uri, _ = ensure_report(model, data, out / "report_padim")
    res = compute_diff(open_report(str(out / "report_patchcore")), open_report(padim_uri))
    keep = (
        "old_models",
        "new_models",
        "matched",
        "scored_in_both",
        "newly_flagged",
        "cleared",
        "flagged_in_both",
        "old_flag_rate_matched",
        "new_flag_rate_matched",
        "spearman",
        "seconds",
    )
    s = {k: res.summary[k] for k in keep}
    s["flips_by_type"] = {}
    for r in res.changes.to_pylist():
        t = defect_type(r["image_uri"])
        s["flips_by_type"].setdefault(t, {"newly_flagged": 0, "cleared": 0})[r["direction"]] += 1
    return s


def markdown(results: dict) -> str:
    lines = [
        "| category | embedding | precision@5 | precision@10 | random | ARI flagged | ARI defective |",
        "|---|---|---|---|---|---|---|",
    ]
    for cat, r in results["categories"].items():
        for kind in ("pooled", "peak"):
            s, c = r["similar"][kind], r["cluster"][kind]
            lines.append(
                f"| {cat} ({r['anomalous']} defective of {r['images']}, K={c['k']}) | {kind} | "
                f"{s['p@5']:.3f} | {s['p@10']:.3f} | {s['random']:.3f} | {c['ari_flagged']:.3f} | "
                f"{c['ari_defective']:.3f} |"
            )
    d = results.get("diff_patchcore_padim_bottle")
    if d:
        lines.append("")
        lines.append(
            f"bottle, PatchCore -> PaDiM over {d['matched']} images: Spearman {d['spearman']:.3f}, "
            f"{d['newly_flagged']} newly flagged, {d['cleared']} cleared, flag rate "
            f"{d['old_flag_rate_matched']:.1%} -> {d['new_flag_rate_matched']:.1%}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="runs/mining_quality")
    ap.add_argument("--categories", default="bottle,magnetic_tile")
    ap.add_argument("--fit-images", type=int, default=0, help="fit on this many seeded train/good images (0: all)")
    ap.add_argument("--coreset", type=float, help="PatchCore coreset ratio (default: the config's 0.1)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    t0, c0 = time.perf_counter(), time.process_time()
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "categories": {},
    }
    for cat in args.categories.split(","):
        data = os.path.join(args.data, CATEGORIES[cat])
        results["categories"][cat] = evaluate_category(cat, data, out / cat, args.fit_images, args.coreset)
        if cat == "bottle":
            results["diff_patchcore_padim_bottle"] = padim_diff(data, out / cat)
    results["wall_s"] = time.perf_counter() - t0
    results["cpu_s"] = time.process_time() - c0
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
