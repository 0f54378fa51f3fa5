"""The bench worker for real, in-process, on a tiny synthetic MVTec-style category (64 px, seconds)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from patchaudit.bench import worker as bench_worker
from patchaudit.bench.runner import expand_grid
from patchaudit.workers.config import ModelConfig


def _write(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def tiny_category(tmp_path_factory) -> Path:
    """10 train/good, 3 test/good, 3 test/spot (a bright square, with its mask), 48x64 RGB."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)

    def normal() -> np.ndarray:
        base = np.linspace(60, 160, 64)[None, :, None].repeat(48, 0).repeat(3, 2)
        return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)  # (48, 64, 3)

    for i in range(10):
        _write(root / "train" / "good" / f"{i:03d}.png", normal())
    for i in range(3):
        _write(root / "test" / "good" / f"{i:03d}.png", normal())
        img, mask = normal(), np.zeros((48, 64), np.uint8)
        y, x = 8 + 10 * i, 10 + 15 * i
        img[y : y + 12, x : x + 12] = (250, 20, 20)
        mask[y : y + 12, x : x + 12] = 255
        _write(root / "test" / "spot" / f"{i:03d}.png", img)
        _write(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return root


@pytest.mark.parametrize("method", ["patchcore", "gaussian"])
def test_worker_fits_scores_and_writes_its_outputs(tiny_category, tmp_path, method):
    from patchaudit.store.objects import open_store

    (cfg,) = expand_grid(ModelConfig(batch_size=8), [method], ["mobilenetv2_100"], [64], [0.5])
    spec = {
        "config_id": cfg.config_id,
        "label": cfg.label,
        "data": open_store(str(tiny_category)).uri,
        "model": dataclasses.asdict(cfg.model),
        "decode_threads": 1,
        "heatmaps": 2,
        "keep_model": False,
        "selection_fraction": 0.5,
        "split_seed": 0,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert bench_worker.main([str(tmp_path)]) == 0
    res = json.loads((tmp_path / "worker_result.json").read_text())

    assert res["n_test"] == 6 and res["n_fit_images"] == 10 and res["n_calibration_images"] == 10
    assert 0.0 <= res["image_auroc"] <= 1.0 and res["image_auroc"] >= 0.5  # a red square is easy
    if method == "patchcore":
        assert 0.5 < res["pixel_auroc"] <= 1.0 and res["aupro"] is not None and res["bank_size"] > 0
    else:
        assert res["pixel_auroc"] is None and res["aupro"] is None
    assert set(res["per_defect"]) == {"spot"}
    assert res["images_per_s"] > 0 and res["images_per_cpu_s"] > 0 and res["fit_s"] > 0
    assert res["model_bytes"] > 1000 and not (tmp_path / "model").exists()  # measured, then removed
    assert res["peak_rss_mb"] >= res["peak_fit_rss_mb"] > 50
    assert res["roc"]["fpr"][0] == 0.0 and res["roc"]["tpr"][-1] == 1.0
    kinds = [h["kind"] for h in res["heatmaps"]]
    assert kinds == ["top"] * 2 + ["false_positive"] * 2 + ["missed"] * 2
    for h in res["heatmaps"]:
        png = (tmp_path / h["file"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    fp = [h for h in res["heatmaps"] if h["kind"] == "false_positive"]
    assert all(h["label"] == 0 for h in fp) and fp[0]["score"] >= fp[1]["score"]

    import pyarrow.parquet as pq

    scores = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    assert len(scores) == 6 and {s["defect_type"] for s in scores} == {"good", "spot"}
    # nested selection: each part holds good and defective images, the two parts cover the split once
    parts = {s["key"]: s["part"] for s in scores}
    for name in ("selection", "report"):
        mine = [s for s in scores if s["part"] == name]
        assert {s["defect_type"] for s in mine} == {"good", "spot"}
        assert res["parts"][name]["n_images"] == len(mine) and res["parts"][name]["image_auroc"] is not None
    assert sum(res["parts"][n]["n_images"] for n in ("selection", "report")) == 6 == len(parts)


def test_overlay_draws_the_mask_outline():
    import io

    from PIL import Image

    image = np.full((40, 40, 3), 100, np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    amap = np.zeros((40, 40), np.float32)
    out = np.asarray(Image.open(io.BytesIO(bench_worker.overlay_png(image, amap, mask, 0.0, 1.0))))
    assert out.shape == (40, 40, 3)
    assert (out[10, 10:20] == 255).all() and (out[15, 15] != 255).any()  # edge white, inside not
    plain = np.asarray(Image.open(io.BytesIO(bench_worker.overlay_png(image, None, None, 0.0, 1.0))))
    assert (plain == 100).all()
