"""patchaudit: batch anomaly scoring of inspection images, as a Python API for notebooks and pipelines.

    import patchaudit

    info = patchaudit.fit("data/bottle", "models/bottle")             # train/good of a category
    metrics = patchaudit.evaluate("data/bottle", "models/bottle")     # its labelled test split
    summary = patchaudit.score("data/bottle/test", "models/bottle", "reports/bottle", single_process=True)
    table = patchaudit.read_report("reports/bottle")                  # a pyarrow.Table, one row per image
    model = patchaudit.load_model("models/bottle")                    # the fitted model, in this process
    print(info["model_id"], metrics["image_auroc"], summary["anomalous"], table.num_rows, model.threshold)

Every location is a folder or an `s3://` prefix. `config` is a YAML path, a dict shaped like
`configs/default.yaml`, or a loaded `Config`; None means the defaults. `score` runs distributed
(Redis Streams + Ray, started locally when none is configured) unless `single_process=True`.

Importing this package is cheap: torch, Ray and Redis load only when a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from patchaudit.errors import PatchauditError

if TYPE_CHECKING:
    import pyarrow as pa

    from patchaudit.scheduler.config import Config
    from patchaudit.workers.model import AnomalyModel

__all__ = ["PatchauditError", "evaluate", "fit", "load_model", "read_report", "score"]


def _config(config: str | dict[str, Any] | Config | None) -> Config:
    from patchaudit.scheduler.config import Config, config_from_dict, load_config

    if config is None or isinstance(config, str):
        return load_config(config)
    if isinstance(config, dict):
        return config_from_dict(config)
    if isinstance(config, Config):
        return config
    raise PatchauditError(f"config must be a YAML path, a dict or a Config, got {type(config).__name__}")


def fit(data: str, out: str, config: str | dict[str, Any] | Config | None = None) -> dict[str, Any]:
    """Fit a model on the defect-free images of `data` and save it to `out`; returns its id, threshold, timings."""
    from patchaudit.scheduler import local

    return local.fit(_config(config), data, out)


def evaluate(
    data: str, model: str, out: str | None = None, config: str | dict[str, Any] | Config | None = None
) -> dict[str, Any]:
    """Score a category's labelled test split; image/pixel AUROC, AUPRO, F1 at the calibrated threshold."""
    from patchaudit.scheduler import local

    return local.evaluate(_config(config), data, model, out)


def score(
    input: str,
    model: str,
    report: str,
    config: str | dict[str, Any] | Config | None = None,
    run_id: str | None = None,
    single_process: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    """Score every image under `input` into a Parquet report; returns the run's summary."""
    cfg = _config(config)
    if single_process:
        from patchaudit.scheduler.local import score_single

        return score_single(cfg, input, model, report, run_id)
    from patchaudit.scheduler.run import run_score

    return run_score(cfg, input, model, report, run_id, workers=workers, progress=False)


def load_model(model: str, device: str = "cpu") -> AnomalyModel:
    """Load a fitted model (checked against its manifest) for scoring in this process."""
    from patchaudit.workers.model import load_model as _load

    return _load(model, device=device)


def read_report(report: str) -> pa.Table:
    """Every row of a report (folder or `s3://` prefix) as one pyarrow Table."""
    from patchaudit.store.objects import open_store
    from patchaudit.store.reports import read_report as _read

    return _read(open_store(report))
