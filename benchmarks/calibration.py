"""Does the threshold hold? Realized false-positive rate on good test images, old protocol vs cross-fitting.

    python benchmarks/calibration.py --data ../shared/data/mvtec_ad/bottle [--config configs/default.yaml]
                                     [--targets 0.01,0.05] [--out FILE.json]

Both protocols on the same embeddings (the backbone runs once per image):
  before  fit on 90% of train/good, threshold = the (1 - target) quantile of the other 10%'s scores
          (the single held-out slice of earlier versions)
  after   k-fold cross-fitting over all of train/good (calibration.folds), threshold = the conformal
          (1 - target) order statistic of the out-of-sample scores; final model fitted on all images
Realized rate = share of test/good images scored at or above the threshold (test labels are used for
nothing else). Prints a table and the CPU seconds of each part (the cross-fitting's cost).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def threshold_rows(cal: Any, oos: Any, test_before: Any, test_after: Any, targets: list[float]) -> list[dict[str, Any]]:
    """Per target: both protocols' thresholds and the share of good test images each flags.

    `cal`: scores of the held-out slice (before); `oos`: out-of-sample cross-fitted scores of every
    training image (after); `test_before` / `test_after`: the good test images scored by the model
    of each protocol. An image is flagged when its score is at or above the threshold, as in `score`.
    """
    import numpy as np

    from patchaudit.workers.calibration import clopper_pearson, conformal_threshold

    cal, oos = np.asarray(cal, dtype=np.float64), np.asarray(oos, dtype=np.float64)
    test_before, test_after = np.asarray(test_before), np.asarray(test_after)
    n_good = len(test_after)
    rows = []
    for t in targets:
        thr_b = float(np.quantile(cal, 1 - t))
        thr_a, ok = conformal_threshold(oos, t)
        k_b, k_a = int((test_before >= thr_b).sum()), int((test_after >= thr_a).sum())
        k_est = int((oos >= thr_a).sum())
        rows.append(
            {
                "target": t,
                "before": {
                    "threshold": thr_b,
                    "n_calibration": len(cal),
                    "flagged": k_b,
                    "realized": k_b / n_good,
                    "realized_ci95": clopper_pearson(k_b, n_good),
                },
                "after": {
                    "threshold": thr_a,
                    "n_calibration": len(oos),
                    "attainable": ok,
                    "estimated": k_est / len(oos),
                    "estimated_ci95": clopper_pearson(k_est, len(oos)),
                    "flagged": k_a,
                    "realized": k_a / n_good,
                    "realized_ci95": clopper_pearson(k_a, n_good),
                },
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--targets", default="0.01,0.05")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from patchaudit.scheduler.config import load_config
    from patchaudit.store.objects import open_store
    from patchaudit.workers.calibration import batches_of, cross_fit_scores, fold_ids, score_from_embeddings
    from patchaudit.workers.datasets import discover, require_test, require_train
    from patchaudit.workers.fit import embed_images, split_calibration
    from patchaudit.workers.model import backbone_for, resolve_device
    from patchaudit.workers.registry import model_class

    config = load_config(args.config).model
    if config.geometry == "tile":
        raise SystemExit("this benchmark scores stored embeddings: use geometry squash or aspect")
    targets = [float(t) for t in args.targets.split(",")]
    store = open_store(args.data)
    ds = discover(store)
    train = sorted(require_train(ds))
    good = [t.key for t in require_test(ds) if t.label == 0]
    backbone = backbone_for(config, resolve_device(config.device))
    cls = model_class(config.method)

    def make():
        torch.manual_seed(config.seed)
        return cls(config, backbone)

    t0, c0 = time.perf_counter(), _cpu()
    with torch.inference_mode():
        tkeys, titems = embed_images(make(), store, train, 2, [])
        _, gitems = embed_images(make(), store, good, 2, [])
    feat = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0}
    pos = {k: i for i, k in enumerate(tkeys)}
    bs = config.batch_size

    # before: one held-out slice
    t0, c0 = time.perf_counter(), _cpu()
    fit_k, cal_k = split_calibration(tkeys, 0.1, config.seed)
    with torch.inference_mode():
        m = make()
        m.fit_embedded(batches_of([titems[pos[k]] for k in fit_k], bs, m.device))
        cal = score_from_embeddings(m, [titems[pos[k]] for k in cal_k], bs)
        test_before = score_from_embeddings(m, gitems, bs)
    before_cost = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0}

    # after: cross-fitting, final model on all
    t0, c0 = time.perf_counter(), _cpu()
    folds = fold_ids(len(titems), config.calibration.folds, config.seed)
    with torch.inference_mode():
        oos = cross_fit_scores(make, titems, folds, bs)
    t1, c1 = time.perf_counter(), _cpu()
    with torch.inference_mode():
        final = make()
        final.fit_embedded(batches_of(titems, bs, final.device))
        test_after = score_from_embeddings(final, gitems, bs)
    cross_cost = {"wall_s": t1 - t0, "cpu_s": c1 - c0}
    final_cost = {"wall_s": time.perf_counter() - t1, "cpu_s": _cpu() - c1}

    rows = threshold_rows(cal, oos, test_before, test_after, targets)
    n_good = len(gitems)
    result = {
        "data": args.data,
        "method": config.method,
        "folds": config.calibration.folds,
        "n_train": len(titems),
        "n_test_good": n_good,
        "features": feat,
        "before_fit": before_cost,
        "cross_fit": cross_cost,
        "final_fit": final_cost,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"{Path(args.data).name}: {config.method}, {len(titems)} train/good, {n_good} test/good, "
        f"{config.calibration.folds} folds"
    )
    print("target | before: realized (95% CI)        | after: estimated (95% CI)       realized (95% CI)")
    for r in rows:
        b, a = r["before"], r["after"]
        print(
            f"{r['target']:6.1%} | {b['realized']:6.1%} = {b['flagged']}/{n_good} "
            f"({b['realized_ci95'][0]:.1%}-{b['realized_ci95'][1]:.1%}) "
            f"| {a['estimated']:6.1%} ({a['estimated_ci95'][0]:.1%}-{a['estimated_ci95'][1]:.1%})   "
            f"{a['realized']:6.1%} = {a['flagged']}/{n_good} ({a['realized_ci95'][0]:.1%}-{a['realized_ci95'][1]:.1%})"
        )
    print(
        f"CPU s: features {feat['cpu_s']:.0f}, old fit+calibration {before_cost['cpu_s']:.0f}, "
        f"cross-fit {cross_cost['cpu_s']:.0f}, final fit {final_cost['cpu_s']:.0f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
