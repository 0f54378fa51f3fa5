"""Shared test fixtures: the real image data under ../shared/data and a small fitted model.

Data location: $PATCHAUDIT_DATA if set, else `../shared/data` next to the repository. When the data
is missing the tests that need it skip with the reason, except under CI=true, where they fail. More
generally, under CI=true every skip (a missing service, package or data) is turned into a failure
that keeps the skip's reason, except for tests marked `gpu`: CI must never pass by skipping. Tests
that use a data fixture get the `data` marker (select them with `-m data` / `-m "not data"`).

The whole session runs with HF_HUB_OFFLINE=1: weights come from local packages or files, never
from the network. It is set at import time because huggingface_hub reads it when first imported.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_FIXTURES = frozenset({"shared_data", "bottle_dir", "magnetic_tile_dir", "small_model"})
SMALL_MODEL_TRAIN_IMAGES = 40  # bottle train/good images: 36 fitted + 4 held out for the threshold
SMALL_MODEL_SEED = 0


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _missing(reason: str) -> None:
    """Skip outside CI; fail in CI (a skipped data test there would hide a broken checkout)."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: data tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


def _fail_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, which does not allow skips: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu") is None:
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:  # a module-level importorskip / pytest.skip(allow_module_level=True)
        _fail_skip(report)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if DATA_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data root ($PATCHAUDIT_DATA, else ../shared/data from the repo root)."""
    env = os.environ.get("PATCHAUDIT_DATA")
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        source = "$PATCHAUDIT_DATA" if env else "../shared/data (relative to the repository root)"
        _missing(f"shared data not found at {root} ({source}); set PATCHAUDIT_DATA to its location")
    return root


def _category(shared_data: Path, rel: str) -> Path:
    path = shared_data / rel
    if not (path / "train" / "good").is_dir() or not (path / "test").is_dir():
        _missing(f"{path} is not an MVTec-style category (needs train/good/ and test/)")
    return path


@pytest.fixture(scope="session")
def bottle_dir(shared_data: Path) -> Path:
    """MVTec AD `bottle`: 209 train/good, test good + broken_large/broken_small/contamination, masks."""
    return _category(shared_data, "mvtec_ad/bottle")


@pytest.fixture(scope="session")
def magnetic_tile_dir(shared_data: Path) -> Path:
    """Magnetic tile defects in MVTec layout (grayscale JPGs of varying size)."""
    return _category(shared_data, "magnetic_tile/magnetic_tile")


@dataclass(frozen=True)
class SmallModel:
    """A PatchCore model fitted on a seeded subset of bottle train/good (see `small_model`)."""

    uri: str  # file:// URI of the model prefix (load with workers.model.load_model)
    path: Path
    model_id: str
    threshold: float
    data_dir: Path  # the bottle category the keys below are relative to
    train_keys: tuple[str, ...]  # fitted and calibration images, all from train/good


@pytest.fixture(scope="session")
def small_model(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SmallModel:
    """Default-config PatchCore (EfficientNet-Lite0, 256x256, 10% coreset) on 40 bottle images.

    Fitted once per session, in-process. Treat it as read-only: other tests share it.
    """
    import numpy as np

    from patchaudit.scheduler.config import load_config
    from patchaudit.store.objects import open_store
    from patchaudit.workers.datasets import discover, require_train
    from patchaudit.workers.fit import fit_model

    store = open_store(str(bottle_dir))
    keys = require_train(discover(store))
    if len(keys) < SMALL_MODEL_TRAIN_IMAGES:
        _missing(f"{bottle_dir}/train/good has {len(keys)} images; small_model needs {SMALL_MODEL_TRAIN_IMAGES}")
    pick = np.random.default_rng(SMALL_MODEL_SEED).choice(len(keys), SMALL_MODEL_TRAIN_IMAGES, replace=False)
    subset = tuple(sorted(keys[i] for i in pick))
    config = load_config(str(REPO_ROOT / "configs" / "default.yaml")).model
    # 2 calibration folds instead of 5: two small coresets instead of five keep this fixture quick
    config = dataclasses.replace(config, calibration=dataclasses.replace(config.calibration, folds=2))
    model, _info = fit_model(config, store, subset)
    out = tmp_path_factory.mktemp("small_model")
    manifest = model.save(str(out))
    return SmallModel(
        uri=open_store(str(out)).uri,
        path=out,
        model_id=manifest["model_id"],
        threshold=float(model.threshold),
        data_dir=bottle_dir,
        train_keys=subset,
    )
