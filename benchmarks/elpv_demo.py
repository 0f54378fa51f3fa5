"""The `make demo` data set and read-out: ELPV solar cells as an MVTec-style folder, then AUROC from a report.

    python benchmarks/elpv_demo.py build   [--out runs/elpv/data] [--cell-type mono|poly] [--seed 0]
                                           [--train 200] [--test-good 150] [--test-defective 150] [--test-possible 50]
    python benchmarks/elpv_demo.py summary [--data runs/elpv/data] [--report runs/elpv/report] [--out FILE]

ELPV (pip: elpv-dataset) holds 2,624 electroluminescence images of solar cells (300x300, 8-bit gray)
labelled by experts with a defect probability of 0, 1/3, 2/3 or 1, and the cell type (mono or poly).
`build` copies a seeded split of ONE cell type (one product per model, as on a real line):
    train/good          defect-free cells (p = 0), fitted on (the threshold from cross-fitting them)
    test/good           other defect-free cells, never seen by the fit
    test/defective      p >= 2/3 (experts fairly or fully sure the cell is defective)
    test/possible       p = 1/3 (experts unsure); reported as its own type
There are no pixel masks: only image-level metrics. `summary` reads the Parquet report that
`patchaudit score` wrote for `test/`, takes the label of each row from its folder name (the labels
are used for nothing else), and prints the image AUROC of each type against test/good plus the
share of each type flagged at the threshold calibrated during the fit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_OUT = os.path.join("runs", "elpv", "data")
DEFAULT_REPORT = os.path.join("runs", "elpv", "report")
MARKER = ".elpv_demo.json"  # written into a built folder; `build` only ever deletes folders that carry it
CELL_TYPES = ("mono", "poly")
PROBABILITIES = (0.0, 1 / 3, 2 / 3, 1.0)


@dataclass(frozen=True)
class Cell:
    path: Path  # the PNG inside the installed package
    probability: float  # expert defect probability: 0, 1/3, 2/3 or 1
    cell_type: str  # mono | poly


def load_labels() -> list[Cell]:
    """The package's labels.csv (columns: path, probability, type), as `elpv_dataset.utils` reads it.

    Read directly rather than through `load_dataset()`, which decodes all 2,624 images into memory:
    the demo copies the original PNG bytes instead.
    """
    try:
        from importlib.resources import files

        data = Path(str(files("elpv_dataset") / "data"))
    except ModuleNotFoundError:
        sys.exit("elpv_demo: the elpv-dataset package is missing; run `make setup` (it is in the 'demo' extra)")
    labels = data / "labels.csv"
    cells = []
    for n, line in enumerate(labels.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise SystemExit(f"elpv_demo: {labels}:{n}: expected 'path probability type', got {line!r}")
        rel, prob, cell_type = parts[0], float(parts[1]), parts[2]
        prob = min(PROBABILITIES, key=lambda p: abs(p - prob))  # 0.3333333333333333 -> 1/3
        cells.append(Cell(data / rel, prob, cell_type))
    return cells


def _pick(cells: list[Cell], n: int, rng: Any) -> tuple[list[Cell], list[Cell]]:
    """(n cells drawn without replacement, the rest); both sorted by file name."""
    order = sorted(cells, key=lambda c: c.path.name)
    idx = set(rng.permutation(len(order))[: min(n, len(order))].tolist())
    return [c for i, c in enumerate(order) if i in idx], [c for i, c in enumerate(order) if i not in idx]


def split(
    cells: list[Cell], cell_type: str, seed: int, train: int, test_good: int, test_defective: int, test_possible: int
) -> dict[str, list[Cell]]:
    """Seeded split into {"train/good", "test/good", "test/defective", "test/possible"}; no cell twice."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mine = [c for c in cells if c.cell_type == cell_type]
    good = [c for c in mine if c.probability == 0.0]
    defective = [c for c in mine if c.probability >= 2 / 3]
    possible = [c for c in mine if c.probability == 1 / 3]
    if train + test_good > len(good):
        raise SystemExit(
            f"elpv_demo: {cell_type} has {len(good)} defect-free cells; "
            f"--train {train} + --test-good {test_good} is more than that"
        )
    train_cells, rest = _pick(good, train, rng)
    test_good_cells, _ = _pick(rest, test_good, rng)
    out = {
        "train/good": train_cells,
        "test/good": test_good_cells,
        "test/defective": _pick(defective, test_defective, rng)[0],
        "test/possible": _pick(possible, test_possible, rng)[0],
    }
    return {k: v for k, v in out.items() if v}


def build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        if not (out / MARKER).is_file():
            sys.exit(
                f"elpv_demo: {out} exists and was not made by this script ({MARKER} missing); "
                "choose another --out or remove it yourself"
            )
        shutil.rmtree(out)
    cells = load_labels()
    parts = split(cells, args.cell_type, args.seed, args.train, args.test_good, args.test_defective, args.test_possible)
    for folder, chosen in parts.items():
        dest = out / folder
        dest.mkdir(parents=True, exist_ok=True)
        for c in chosen:
            shutil.copyfile(c.path, dest / c.path.name)
    counts = {folder: len(chosen) for folder, chosen in parts.items()}
    meta = {
        "source": "elpv-dataset (pip)",
        "cells_in_package": len(cells),
        "cell_type": args.cell_type,
        "seed": args.seed,
        "counts": counts,
        "files": {folder: [c.path.name for c in chosen] for folder, chosen in parts.items()},
    }
    (out / MARKER).write_text(json.dumps(meta, indent=1))
    print(f"built {out}: {args.cell_type} cells, seed {args.seed}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def summarize(data: Path, report_uri: str) -> dict[str, Any]:
    """Per-type image AUROC (vs test/good) and flagged share, from a finished report of `data/test`."""
    from patchaudit.evaluation.metrics import auroc
    from patchaudit.store import reports
    from patchaudit.store.objects import open_store

    report = open_store(report_uri)
    if not reports.is_complete(report):
        raise SystemExit(
            f"elpv_demo: {report.uri} is not a finished report (no _SUCCESS); run `patchaudit score` first"
        )
    rows = reports.read_report(report).to_pylist()
    summary = reports.read_summary(report)
    test_uri = open_store(str(data / "test")).uri + "/"
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    errors = 0
    for r in rows:
        if r["error"] is not None:
            errors += 1
            continue
        if not r["image_uri"].startswith(test_uri):
            raise SystemExit(f"elpv_demo: report row {r['image_uri']} is not under {test_uri}")
        by_type[r["image_uri"][len(test_uri) :].split("/", 1)[0]].append(r)
    if "good" not in by_type or len(by_type) < 2:
        raise SystemExit(f"elpv_demo: the report needs test/good and at least one defect type, got {sorted(by_type)}")
    good = [r["score"] for r in by_type["good"]]
    out: dict[str, Any] = {
        "report_uri": report.uri,
        "run_id": summary.get("run_id"),
        "model_id": summary.get("model_id"),
        "threshold": summary.get("threshold"),
        "images": len(rows),
        "errors": errors,
        "images_per_second": summary.get("images_per_second"),
        "types": {},
    }
    for name, rs in sorted(by_type.items()):
        scores = [r["score"] for r in rs]
        entry: dict[str, Any] = {"n": len(rs), "flagged": sum(bool(r["is_anomalous"]) for r in rs) / len(rs)}
        if name != "good":
            entry["image_auroc"] = auroc([0] * len(good) + [1] * len(scores), good + scores)
        out["types"][name] = entry
    if "defective" in out["types"]:
        out["image_auroc"] = out["types"]["defective"]["image_auroc"]
    return out


def print_summary(s: dict[str, Any]) -> None:
    ips = s["images_per_second"]
    print(
        f"report: {s['report_uri']}  (run {s['run_id']}, {s['images']} images, {s['errors']} errors"
        + (f", {ips:.1f} images/s)" if ips else ")")
    )
    print(f"{'type':<12} {'n':>5} {'image AUROC vs good':>20} {'flagged':>8}")
    for name, e in s["types"].items():
        au = f"{e['image_auroc']:.4f}" if "image_auroc" in e else "-"
        print(f"{name:<12} {e['n']:>5} {au:>20} {e['flagged']:>8.1%}")
    print(f"flagged = score >= {s['threshold']:.4f}, the threshold calibrated on held-out train/good cells")
    if "image_auroc" in s:
        print(f"image AUROC (defective vs good): {s['image_auroc']:.4f}")


def summary_cmd(args: argparse.Namespace) -> int:
    s = summarize(Path(args.data), args.report)
    print_summary(s)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no runs/
        Path(args.out).write_text(json.dumps(s, indent=2))
        print(f"wrote {args.out}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the MVTec-style ELPV folder")
    b.add_argument("--out", default=DEFAULT_OUT)
    b.add_argument(
        "--cell-type",
        choices=CELL_TYPES,
        default="mono",
        help="one product per model; mono cells are the more homogeneous type (default)",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--train", type=int, default=200, help="defect-free cells in train/good")
    b.add_argument("--test-good", type=int, default=150, help="held-out defect-free cells in test/good")
    b.add_argument("--test-defective", type=int, default=150, help="cells with p >= 2/3 in test/defective")
    b.add_argument("--test-possible", type=int, default=50, help="cells with p = 1/3 in test/possible (0: none)")
    s = sub.add_parser("summary", help="image AUROC per type from a finished report of DATA/test")
    s.add_argument("--data", default=DEFAULT_OUT)
    s.add_argument("--report", default=DEFAULT_REPORT)
    s.add_argument("--out", help="also write the numbers as JSON here")
    args = p.parse_args(argv)
    for name in ("train", "test_good", "test_defective", "test_possible"):
        if getattr(args, name, 0) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.command == "build" and (args.train < 2 or args.test_good < 1):
        p.error("need --train >= 2 (fit + calibration) and --test-good >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return build(args) if args.command == "build" else summary_cmd(args)


if __name__ == "__main__":
    sys.exit(main())
