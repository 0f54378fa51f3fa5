"""`patchaudit bench`: a grid of configurations, each fitted and evaluated with the honest protocol.

Protocol (every configuration): fit on train/good; the threshold is the (1 - target_fpr) order
statistic of out-of-sample scores of every train/good image (k-fold cross-fitting); no center crop; test labels are used for the
metrics only. Each configuration runs in its own child process (`python -m patchaudit.bench.worker`),
so its peak memory is its own and a crash takes only that configuration down.

Output folder layout:
    bench.json                        which data this folder benchmarks (a rerun must name the same)
    configs/<config_id>/result.json   written as soon as the configuration finishes (resume key)
    configs/<config_id>/{spec.json, log.txt, scores.parquet, heatmaps/*.png}
    configs/<config_id>/lock          pid of the bench process running it (two benches may share a folder)
    results.json, results.parquet, per_defect.parquet, report.html, recommended*.yaml   (at the end)

A config id is a stable hash of the full model config: rerunning with the same folder skips every
configuration whose result.json says "ok"; failed ones are retried. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from patchaudit.bench.pareto import pareto_mask, recommend
from patchaudit.bench.report import write_report
from patchaudit.bench.selection import DEFAULT_FRACTION, REPORT, SELECTION, accuracy
from patchaudit.errors import ConfigError, PatchauditError
from patchaudit.schema import Schema, opt
from patchaudit.workers.config import GEOMETRIES, ModelConfig, model_config_from_dict
from patchaudit.workers.registry import METHODS

PROTOCOL_VERSION = (
    3  # bump when the measurement changes: old results then stop matching (2: nested parts, 3: cross-fitted thresholds)
)
# feature levels (timm out_indices) per method, as in configs/*.yaml
METHOD_LAYERS = {name: info.layers for name, info in METHODS.items()}
SPEED_KEYS = {"wall": "images_per_s", "cpu": "images_per_cpu_s"}
DEFAULT_TOLERANCE = 0.01
DISPLAY_NAMES = {
    "accuracy": "accuracy",
    "image_auroc": "image AUROC",
    "images_per_s": "images/s",
    "images_per_cpu_s": "images per CPU-second",
    "model_mb": "MB on disk",
    # nested selection ranks on these: the reason a recommendation gives names the part
    "sel_accuracy": "accuracy on the selection part",
    "sel_image_auroc": "image AUROC on the selection part",
}

ACCURACY_DEFINITION = (
    "accuracy = (image AUROC + AUPRO) / 2, for methods that produce anomaly maps. AUPRO (FPR up to 0.3) "
    "is used rather than pixel AUROC because pixel AUROC is dominated by the large defect-free area and "
    "sits near its ceiling for every map method, while AUPRO weighs every defect region equally, small "
    "ones included. Gaussian AD produces no map, so its pixel metrics and this accuracy are n/a (not 0): "
    "it is ranked only on the image-level front, where accuracy = image AUROC."
)
RULE_DEFINITION = (
    "Pareto-optimal: no other configuration is at least as good on all three of accuracy (higher), "
    "scoring speed (higher) and model size on disk (lower) and strictly better on one. "
    "Recommendation: among the Pareto-optimal configurations, those whose accuracy is within the "
    "tolerance of the best accuracy; of those the fastest (ties: smaller model)."
)


class BenchError(PatchauditError):
    """A benchmark cannot run as asked (bad grid, output folder of other data, worker failure)."""


@dataclass(frozen=True)
class BenchConfig:
    model: ModelConfig
    config_id: str

    @property
    def label(self) -> str:
        """Short human name, e.g. patchcore/tf_efficientnet_lite0/256/c0.1 (+ /aspect, /tile, /tile@0.5x)."""
        m = self.model
        size = m.image_size[0] if m.image_size[0] == m.image_size[1] else "x".join(map(str, m.image_size))
        parts = [m.method, m.backbone, str(m.tile_size if m.geometry == "tile" else size)]
        if m.method == "patchcore":
            parts.append(f"c{m.patchcore.coreset_ratio:g}")
        if m.geometry != "squash":
            parts.append(geometry_tag(m))
        return "/".join(parts)


@dataclass(frozen=True)
class BenchOptions(Schema):
    """How `patchaudit bench` measures (from its command-line options); checked when made."""

    schema_path: ClassVar[str] = "bench option "

    decode_threads: int = opt(2, "image-decoding threads per configuration", ge=1)
    heatmaps: int = opt(3, "heatmaps per kind (top-scoring, worst false positives, missed defects)", ge=0)
    keep_models: bool = opt(False, "keep each configuration's fitted model")
    timeout_s: float | None = opt(None, "seconds per configuration; null: no limit", gt=0)
    tolerance: float = opt(
        DEFAULT_TOLERANCE, "accuracy within this of the best counts as equal when recommending", ge=0
    )
    speed: str = opt(
        "wall",
        "speed measure: images/s end to end, or images per CPU-second (robust on a shared box)",
        choices=tuple(SPEED_KEYS),
    )
    selection_fraction: float = opt(
        DEFAULT_FRACTION, "share of the test images used to rank and recommend; 0: all", ge=0, lt=1
    )
    split_seed: int = opt(0, "seed of the stratified selection/report cut")

    @property
    def nested(self) -> bool:
        return self.selection_fraction > 0


# --------------------------------------------------------------------------- the grid


def parse_list(text: str | Sequence[Any], what: str, kind: type = str) -> list[Any]:
    """'a,b,c' -> [a, b, c] converted to `kind`; errors name the option and the bad item."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    items = [s for s in items if s != ""]
    if not items:
        raise ConfigError(f"--{what} needs at least one value (comma-separated)")
    out = []
    for s in items:
        try:
            out.append(kind(s))
        except (TypeError, ValueError):
            raise ConfigError(f"--{what}: {s!r} is not a valid {kind.__name__}") from None
    return list(dict.fromkeys(out))  # keep order, drop duplicates


def config_id(model: ModelConfig) -> str:
    """Stable 12-hex id of a full model config (and the protocol version)."""
    doc = {"protocol": PROTOCOL_VERSION, "model": dataclasses.asdict(model)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def geometry_tag(m: ModelConfig) -> str:
    """aspect | aspect-long | tile | tile@0.5x: the input geometry in a label."""
    if m.geometry == "aspect":
        return "aspect" if m.aspect_side == "short" else "aspect-long"
    if m.geometry == "tile":
        return "tile" if m.tile_scale == 1.0 else f"tile@{m.tile_scale:g}x"
    return m.geometry


def expand_grid(
    base: ModelConfig,
    methods: Sequence[str],
    backbones: Sequence[str],
    sizes: Sequence[int],
    coresets: Sequence[float],
    geometries: Sequence[str] = ("squash",),
) -> list[BenchConfig]:
    """methods x backbones x sizes x geometries (x coreset ratios, for PatchCore only), from `base`.

    Layers come from METHOD_LAYERS; everything else (calibration, seed, map sigma, aspect_side,
    tile_overlap, tile_scale...) from `base`. A size is the side the backbone sees: squash resizes to
    [size, size], aspect makes the short (or long) side `size`, tile cuts `size` px tiles.
    No center crop (the honest protocol): a base config with a crop is refused.
    """
    if base.center_crop is not None:
        raise ConfigError("bench uses no center crop (it hides defects at the border); remove model.center_crop")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: {m!r} is not valid; choose from {', '.join(METHODS)}")
    for s in sizes:
        if s < 32:
            raise ConfigError(f"--sizes: {s} is too small; image sizes must be >= 32")
    for c in coresets:
        if not 0.0 < c <= 1.0:
            raise ConfigError(f"--coreset: {c} is not in (0, 1]")
    for g in geometries:
        if g not in GEOMETRIES:
            raise ConfigError(f"--geometry: {g!r} is not valid; choose from {', '.join(GEOMETRIES)}")
        if g == "tile" and any(s % 32 for s in sizes):
            raise ConfigError(
                f"--geometry tile: tile sizes come from --sizes and must be multiples of 32, "
                f"got {', '.join(map(str, sizes))}"
            )
    grid: list[BenchConfig] = []
    seen: set[str] = set()
    for method in methods:
        for backbone in backbones:
            for size in sizes:
                for geometry in geometries:
                    for ratio in coresets if method == "patchcore" else coresets[:1]:
                        d = dataclasses.asdict(base)
                        d.update(
                            method=method, backbone=backbone, layers=list(METHOD_LAYERS[method]), geometry=geometry
                        )
                        if geometry == "tile":  # image_size is unused: keep the base's
                            d["tile_size"] = size
                        else:
                            d["image_size"] = [size, size]
                        if method == "patchcore":
                            d["patchcore"]["coreset_ratio"] = ratio
                        model = model_config_from_dict(d)
                        cid = config_id(model)
                        if cid not in seen:
                            seen.add(cid)
                            grid.append(BenchConfig(model, cid))
    return grid


# --------------------------------------------------------------------------- running


Runner = Callable[[BenchConfig, str, Path, BenchOptions], dict[str, Any]]
Log = Callable[[str], None]


def _write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader (or a resumed bench) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default, allow_nan=False))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def read_result(config_dir: Path) -> dict[str, Any] | None:
    path = config_dir / "result.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged result counts as not done


def is_done(cfg: BenchConfig, config_dir: Path) -> bool:
    res = read_result(config_dir)
    return res is not None and res.get("status") == "ok" and res.get("config_id") == cfg.config_id


def run_in_subprocess(cfg: BenchConfig, data_uri: str, config_dir: Path, options: BenchOptions) -> dict[str, Any]:
    """Run one configuration in `python -m patchaudit.bench.worker`; return the worker's result dict."""
    spec = {
        "config_id": cfg.config_id,
        "label": cfg.label,
        "data": data_uri,
        "model": dataclasses.asdict(cfg.model),
        "decode_threads": options.decode_threads,
        "heatmaps": options.heatmaps,
        "keep_model": options.keep_models,
        "selection_fraction": options.selection_fraction,
        "split_seed": options.split_seed,
    }
    _write_json(config_dir / "spec.json", spec)
    out = config_dir / "worker_result.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # weights from local packages only
    cmd = [sys.executable, "-m", "patchaudit.bench.worker", str(config_dir)]
    with open(config_dir / "log.txt", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=options.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BenchError(f"{cfg.label} ran past the timeout of {options.timeout_s:g} s") from None
        except BaseException:  # Ctrl-C: do not leave the child running
            proc.kill()
            proc.wait()
            raise
    if rc != 0 or not out.is_file():
        tail = (config_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{cfg.label}: worker exited with status {rc}: " + " | ".join(tail))
    return json.loads(out.read_text())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def take_lock(config_dir: Path) -> bool:
    """Claim a configuration for this process (lock file with our pid); False if a live process holds it.

    Lets two benches share one output folder without running a configuration twice; the lock of a
    process that died is taken over. Same-host only (pids).
    """
    path = config_dir / "lock"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _pid_alive(owner):
                return False
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def _check_folder(out_dir: Path, data_uri: str, options: BenchOptions) -> None:
    """One folder, one bench: the same data and the same selection/report cut (finished results are reused)."""
    meta = out_dir / "bench.json"
    split = {"selection_fraction": options.selection_fraction, "split_seed": options.split_seed}
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old.get("data") != data_uri:
            raise BenchError(f"{out_dir} holds a bench of {old.get('data')}, not {data_uri}; use another --out folder")
        old_split = {k: old.get(k, 0.0 if k == "selection_fraction" else 0) for k in split}
        if old_split != split and old.get("protocol") == PROTOCOL_VERSION:
            raise BenchError(
                f"{out_dir} holds a bench with --selection-fraction {old_split['selection_fraction']:g} "
                f"--split-seed {old_split['split_seed']}; use those or another --out folder"
            )
        if old.get("protocol") == PROTOCOL_VERSION:
            return
    _write_json(meta, {"data": data_uri, "protocol": PROTOCOL_VERSION, **split})


def run_bench(
    data_uri: str,
    out_dir: str | os.PathLike[str],
    grid: Sequence[BenchConfig],
    options: BenchOptions = BenchOptions(),
    runner: Runner | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Run every configuration of `grid` not already done in `out_dir`; write the summary and report.

    Returns the summary (as written to results.json).
    """
    options.validate()
    runner = runner or run_in_subprocess
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    _check_folder(out, data_uri, options)
    n_run = n_skip = n_fail = n_busy = 0
    for k, cfg in enumerate(grid, 1):
        cdir = out / "configs" / cfg.config_id
        head = f"[{k}/{len(grid)}] {cfg.label} ({cfg.config_id})"
        if is_done(cfg, cdir):
            n_skip += 1
            log(f"{head}: done before, skipped")
            continue
        cdir.mkdir(parents=True, exist_ok=True)
        if not take_lock(cdir):
            n_busy += 1
            log(f"{head}: running in another bench process, skipped")
            continue
        try:
            if is_done(cfg, cdir):  # finished by another process since we looked
                n_skip += 1
                log(f"{head}: done before, skipped")
                continue
            (cdir / "result.json").unlink(missing_ok=True)
            log(f"{head}: running")
            t0 = time.perf_counter()
            base = {
                "config_id": cfg.config_id,
                "label": cfg.label,
                "data": data_uri,
                "model": dataclasses.asdict(cfg.model),
                "protocol": PROTOCOL_VERSION,
            }
            try:
                res = runner(cfg, data_uri, cdir, options)
            except PatchauditError as exc:
                n_fail += 1
                _write_json(cdir / "result.json", {**base, "status": "failed", "error": str(exc)})
                log(f"{head}: FAILED: {exc}")
                continue
            n_run += 1
            res = {**res, **base, "status": "ok", "wall_s": time.perf_counter() - t0}
            _write_json(cdir / "result.json", res)  # persisted now: a later crash cannot lose it
            log(f"{head}: {_one_line(res)}")
        finally:
            (cdir / "lock").unlink(missing_ok=True)
    log(f"bench: {n_run} run, {n_skip} skipped (done before), {n_busy} running elsewhere, {n_fail} failed")
    results = [read_result(out / "configs" / c.config_id) or {} for c in grid]
    summary = summarize(results, data_uri, options)
    write_outputs(summary, out)
    return summary


def _one_line(r: dict[str, Any]) -> str:
    return (
        f"image AUROC {_f(r.get('image_auroc'))}, pixel AUROC {_f(r.get('pixel_auroc'))}, "
        f"AUPRO {_f(r.get('aupro'))}, F1 {_f(r.get('f1'))}, fit {r.get('fit_s', 0):.0f} s, "
        f"{r.get('images_per_s', 0):.2f} img/s, {r.get('model_mb', 0):.1f} MB, "
        f"peak {r.get('peak_rss_mb', 0):.0f} MB"
    )


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


# --------------------------------------------------------------------------- summary


ROW_FIELDS = (
    "config_id",
    "label",
    "status",
    "method",
    "backbone",
    "image_size",
    "geometry",
    "coreset_ratio",
    "layers",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "accuracy",
    "f1",
    "precision",
    "recall",
    "threshold",
    "fit_s",
    "fit_cpu_s",
    "images_per_s",
    "images_per_cpu_s",
    "model_mb",
    "peak_rss_mb",
    "peak_fit_rss_mb",
    "n_test",
    "error",
    # nested selection: the same metrics on the selection part (ranking) and the report part (shown)
    "sel_image_auroc",
    "sel_aupro",
    "sel_accuracy",
    "rep_image_auroc",
    "rep_pixel_auroc",
    "rep_aupro",
    "rep_accuracy",
    "rep_f1",
)


def _geometry_name(m: dict[str, Any]) -> str:
    """squash / aspect / tile tag of a result's model dict (results of older versions: squash)."""
    try:
        return geometry_tag(model_config_from_dict(m)) if m.get("geometry") else "squash"
    except PatchauditError:
        return str(m.get("geometry"))


def make_row(res: dict[str, Any]) -> dict[str, Any]:
    """One flat row per configuration (the Parquet table); accuracy as ACCURACY_DEFINITION says."""
    m = res.get("model", {})
    row = {k: res.get(k) for k in ROW_FIELDS}
    row.update(
        method=m.get("method"),
        backbone=m.get("backbone"),
        image_size=(m.get("image_size") or [None])[0] if m.get("geometry") != "tile" else m.get("tile_size"),
        geometry=_geometry_name(m),
        coreset_ratio=m.get("patchcore", {}).get("coreset_ratio") if m.get("method") == "patchcore" else None,
        layers=",".join(map(str, m.get("layers", []))),
    )
    ok = res.get("status") == "ok"
    row["accuracy"] = accuracy(res.get("image_auroc"), res.get("aupro")) if ok else None
    parts = res.get("parts") or {}
    for prefix, name in (("sel", SELECTION), ("rep", REPORT)):
        p = parts.get(name) or {}
        for key in ("image_auroc", "pixel_auroc", "aupro", "f1"):
            if f"{prefix}_{key}" in ROW_FIELDS:
                row[f"{prefix}_{key}"] = p.get(key) if ok else None
        row[f"{prefix}_accuracy"] = accuracy(p.get("image_auroc"), p.get("aupro")) if ok else None
    return row


SELECTION_RULE = (
    "The labelled test images are cut (seeded, stratified by defect type) into a selection part and a report "
    "part. Configurations are ranked, and one recommended, on the selection part only; the numbers shown for "
    "the recommendation are the report part's, which took no part in choosing it. Full-split numbers are "
    "given for comparison with published tables and are optimistic for the configuration chosen on them."
)
NO_SELECTION_RULE = (
    "Ranked and reported on the full test split (--selection-fraction 0): the recommended configuration's "
    "numbers are optimistic, since they come from the images it was chosen on."
)


def _rec_numbers(rows: Sequence[dict[str, Any]], index: int, metric: str, options: BenchOptions) -> dict[str, Any]:
    """The recommended row's metric on each part, and the optimistic full-split pick it replaces.

    `optimistic_full` is what choosing and reporting on the same full test split would have shown (the
    best full-split value of any configuration); `optimism` is how far the honest report-part number of
    the recommendation falls below it.
    """
    r = rows[index]
    full = [x[metric] for x in rows if x.get("status") == "ok" and x.get(metric) is not None]
    best_full = max(full) if full else None
    out = {"metric": metric, "full": r.get(metric), "optimistic_full": best_full}
    if options.nested:
        report = r.get(f"rep_{metric}")
        out.update(
            selection=r.get(f"sel_{metric}"),
            report=report,
            optimism=None if report is None or best_full is None else best_full - report,
        )
    return out


def summarize(results: Sequence[dict[str, Any]], data_uri: str, options: BenchOptions) -> dict[str, Any]:
    """Rows, Pareto marks (pixel-level and image-level) and the two recommendations."""
    rows = [make_row(r) for r in results if r.get("config_id")]
    speed = SPEED_KEYS[options.speed]
    ok = [r["status"] == "ok" for r in rows]
    recs: dict[str, Any] = {}
    # Nested: rank on the selection part; the report part's numbers are the ones to show.
    sel = "sel_" if options.nested else ""
    for flag, acc_key in (("pareto", f"{sel}accuracy"), ("pareto_image", f"{sel}image_auroc")):
        cand = [r if good else {} for r, good in zip(rows, ok)]  # failed rows take no part
        mask = pareto_mask(cand, [(acc_key, "max"), (speed, "max"), ("model_mb", "min")])
        for r, m in zip(rows, mask):
            r[flag] = m
        rec = recommend(cand, mask, acc_key, speed, "model_mb", options.tolerance, DISPLAY_NAMES)
        key = "recommended" if flag == "pareto" else "recommended_image"
        for i, r in enumerate(rows):
            r[key] = rec is not None and rec.index == i
        recs[key] = (
            None
            if rec is None
            else {
                "config_id": rows[rec.index]["config_id"],
                "label": rows[rec.index]["label"],
                "reason": rec.reason,
                "accuracy_key": acc_key,
                **_rec_numbers(rows, rec.index, acc_key.removeprefix("sel_"), options),
            }
        )
    return {
        "data": data_uri,
        "dataset": os.path.basename(data_uri.rstrip("/")),
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "protocol_version": PROTOCOL_VERSION,
        "protocol": (
            "fit on train/good; threshold = (1 - target_fpr) order statistic of k-fold cross-fitted "
            "out-of-sample scores of every train/good image x margin; no center crop; test labels used "
            "for the metrics only"
        ),
        "selection": {
            "fraction": options.selection_fraction,
            "seed": options.split_seed,
            "ranked_on": "selection part" if options.nested else "full test split (optimistic: no nested selection)",
            "rule": SELECTION_RULE if options.nested else NO_SELECTION_RULE,
        },
        "accuracy_definition": ACCURACY_DEFINITION,
        "rule": RULE_DEFINITION,
        "layers": {m: list(v) for m, v in METHOD_LAYERS.items()},
        "speed_metric": speed,
        "tolerance": options.tolerance,
        "machine": {"cpus": os.cpu_count(), "load_avg_at_summary": [round(v, 2) for v in os.getloadavg()]},
        **recs,
        "rows": rows,
        "results": list(results),
    }


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    """results.json, results.parquet, per_defect.parquet, recommended*.yaml, report.html."""
    _write_json(out / "results.json", summary)
    rows = summary["rows"]
    if rows:
        pq.write_table(pa.Table.from_pylist(rows), out / "results.parquet")
    per_defect = [
        {"config_id": r["config_id"], "label": r.get("label"), "defect_type": name, **d}
        for r in summary["results"]
        if r.get("status") == "ok"
        for name, d in sorted(r.get("per_defect", {}).items())
    ]
    if per_defect:
        pq.write_table(pa.Table.from_pylist(per_defect), out / "per_defect.parquet")
    by_id = {r.get("config_id"): r for r in summary["results"]}
    for key in ("recommended", "recommended_image"):
        rec = summary.get(key)
        path = out / f"{key}.yaml"
        if rec is None:
            path.unlink(missing_ok=True)
            continue
        note = f"# patchaudit bench {key.replace('_', ' ')}: {rec['label']}\n# {rec['reason']}\n"
        path.write_text(note + yaml.safe_dump({"model": by_id[rec["config_id"]]["model"]}, sort_keys=False))
    write_report(summary, out)


# --------------------------------------------------------------------------- printing


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The full results table in Markdown (n/a for missing values; * Pareto, R recommended)."""
    head = (
        "config",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
        "accuracy",
        "F1",
        "sel. accuracy",
        "report accuracy",
        "fit s",
        "img/s",
        "img/CPU-s",
        "model MB",
        "peak MB",
        "Pareto (pix/img)",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r.get('label')} | failed: {r.get('error', '')[:80]} |" + " |" * (len(head) - 2))
            continue
        marks = ("*" if r.get("pareto") else "-") + "/" + ("*" if r.get("pareto_image") else "-")
        if r.get("recommended"):
            marks += " R-pix"
        if r.get("recommended_image"):
            marks += " R-img"
        cells = [
            r["label"],
            _f(r["image_auroc"]),
            _f(r["pixel_auroc"]),
            _f(r["aupro"]),
            _f(r["accuracy"]),
            _f(r["f1"]),
            _f(r.get("sel_accuracy")),
            _f(r.get("rep_accuracy")),
            f"{r['fit_s']:.0f}",
            f"{r['images_per_s']:.2f}",
            f"{r['images_per_cpu_s']:.2f}",
            f"{r['model_mb']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
            marks,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
