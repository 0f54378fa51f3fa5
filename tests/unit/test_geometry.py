"""Input geometry (squash / aspect / tile): sizes, tiling coverage and stitching, refusal, manifest."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from patchaudit.errors import ConfigError, PatchauditError
from patchaudit.workers.config import model_config_from_dict
from patchaudit.workers.decode import Preprocess, decode_image
from patchaudit.workers.geometry import aspect_size, group_by_shape, round_to_stride, tile_canvas_size
from patchaudit.workers.tiling import cut_tiles, stitch, tile_boxes, tile_starts

# --------------------------------------------------------------------------- sizes


def test_round_to_stride():
    assert round_to_stride(250, 32) == 256
    assert round_to_stride(271, 32) == 256 and round_to_stride(273, 32) == 288
    assert round_to_stride(3, 32) == 32  # never below one stride


@pytest.mark.parametrize(
    "h, w, which, want",
    [
        (450, 900, "short", (256, 512)),  # 2:1 kept exactly
        (450, 900, "long", (128, 256)),
        (300, 110, "short", (704, 256)),  # 256 * 300/110 = 698.2 -> 704 (the nearest multiple of 32)
        (900, 900, "short", (256, 256)),
    ],
)
def test_aspect_size_keeps_ratio_and_rounds_to_stride(h, w, which, want):
    got = aspect_size(h, w, 256, which, 32)
    assert got == want
    assert got[0] % 32 == 0 and got[1] % 32 == 0
    assert abs(got[0] / got[1] - h / w) <= (16 / min(got)) * (h / w) + 1e-9  # at most half a stride off


def test_tile_canvas_size_scales_and_enlarges_small_images():
    assert tile_canvas_size(2000, 3000, 1.0, 256, 32) == (1984, 3008)  # 62.5 strides round to 62
    assert tile_canvas_size(2000, 3000, 0.5, 256, 32) == (992, 1504)
    assert tile_canvas_size(100, 300, 1.0, 256, 32) == (256, 768)  # short side enlarged to one tile


def test_group_by_shape_in_order_of_first_appearance():
    assert group_by_shape([(2, 3), (4, 5), (2, 3), (1, 1)]) == [[0, 2], [1], [3]]


# --------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("length", [256, 288, 480, 512, 896, 3008])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_tile_starts_cover_every_pixel_on_the_stride(length, overlap):
    tile, stride = 256, 32
    starts = tile_starts(length, tile, overlap, stride)
    assert starts[0] == 0 and starts[-1] == length - tile
    assert all(s % stride == 0 for s in starts)
    assert all(b - a <= tile for a, b in zip(starts, starts[1:]))  # no gap between consecutive tiles
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    if overlap > 0 and length > tile:  # neighbours share at least about the asked overlap
        assert min(a + tile - b for a, b in zip(starts, starts[1:])) >= overlap * tile - stride


def test_cut_tiles_and_stitch_average_overlaps():
    boxes = tile_boxes(96, 64, 64, 0.5, 32)  # rows at 0 and 32, one column
    assert boxes == [(0, 0), (32, 0)]
    px = np.arange(96 * 64 * 3, dtype=np.uint8).reshape(96, 64, 3)
    tiles = cut_tiles(px, boxes, 64)
    assert tiles.shape == (2, 64, 64, 3) and np.array_equal(tiles[1], px[32:96])
    grids = torch.stack([torch.full((8, 8), 1.0), torch.full((8, 8), 3.0)])  # cell = 8 px
    out = stitch(grids, boxes, 8, (96, 64))
    assert out.shape == (12, 8)
    assert torch.allclose(out[:4], torch.tensor(1.0))  # only the first tile
    assert torch.allclose(out[4:8], torch.tensor(2.0))  # overlap: the mean of both
    assert torch.allclose(out[8:], torch.tensor(3.0))  # only the second


def test_stitch_rejects_uncovered_or_off_grid_tiles():
    with pytest.raises(ValueError, match="do not cover"):
        stitch(torch.ones(1, 4, 4), [(0, 0)], 8, (64, 64))
    with pytest.raises(ValueError, match="patch grid"):
        stitch(torch.ones(1, 4, 4), [(4, 0)], 8, (32, 32))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "model, msg",
    [
        ({"geometry": "letterbox"}, "model.geometry"),
        ({"geometry": "aspect", "image_size": [256, 512]}, "must be square"),
        ({"geometry": "aspect", "center_crop": [224, 224]}, "center_crop works only with geometry squash"),
        ({"geometry": "tile", "tile_size": 250}, "multiple of 32"),
        ({"tile_overlap": 0.95}, "tile_overlap"),
        ({"tile_scale": 0}, "tile_scale"),
        ({"aspect_side": "wide"}, "model.aspect_side"),
        ({"geometry": "tile", "patchcore": {"score": "reweighted"}}, "use score: max"),
    ],
)
def test_geometry_config_errors(model, msg):
    with pytest.raises(ConfigError, match=msg):
        model_config_from_dict(model)


def test_default_yaml_documents_the_geometry_fields():
    import pathlib

    import yaml

    text = (pathlib.Path(__file__).resolve().parents[2] / "configs" / "default.yaml").read_text()
    model = yaml.safe_load(text)["model"]
    cfg = model_config_from_dict(model)
    assert cfg.geometry == "squash"
    for key in ("geometry", "aspect_side", "tile_size", "tile_overlap", "tile_scale"):
        assert key in model


# --------------------------------------------------------------------------- decode


def _png(h: int, w: int, seed: int = 0, value: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    if value is not None:
        arr = np.full((h, w, 3), value, np.uint8)
    else:
        arr = rng.integers(90, 110, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_resizes_as_the_geometry_says():
    data = _png(45, 90)
    assert decode_image(data, Preprocess((64, 64))).pixels.shape == (64, 64, 3)
    aspect = decode_image(data, Preprocess((64, 64), geometry="aspect", stride=32))
    assert aspect.pixels.shape == (64, 128, 3) and aspect.original_size == (45, 90)
    tile = decode_image(data, Preprocess((64, 64), geometry="tile", stride=32, tile_size=64, tile_scale=2.0))
    assert tile.pixels.shape == (96, 192, 3)  # 90x180 rounded to the stride


# --------------------------------------------------------------------------- models end to end


def _write_set(root, shapes, n_train=6):
    from patchaudit.store.objects import open_store

    store = open_store(str(root))
    for i in range(n_train):
        h, w = shapes[i % len(shapes)]
        store.write_bytes(f"train/good/{i:03d}.png", _png(h, w, seed=i))
    return store


def _fit(store, **model):
    from patchaudit.workers.fit import fit_model

    base = {
        "image_size": [64, 64],
        "tile_size": 64,
        "batch_size": 4,
        "device": "cpu",
        "calibration": {"folds": 3},
        "patchcore": {"coreset_ratio": 0.5},
    }
    base.update(model)
    keys = sorted(k.key for k in store.list("train/good/"))
    return fit_model(model_config_from_dict(base), store, keys, threads=1)[0]


def _score(model, store, keys):
    from patchaudit.workers.pipeline import score_keys

    return list(score_keys(model, store.read_bytes, keys, threads=1, keep_maps=True))


@pytest.mark.parametrize("geometry", ["aspect", "tile"])
def test_patchcore_scores_any_shape_with_maps_over_the_original(tmp_path, geometry):
    store = _write_set(tmp_path / "d", [(48, 96), (40, 120)])
    model = _fit(store, geometry=geometry)
    store.write_bytes("q/a.png", _png(50, 100, seed=99))
    store.write_bytes("q/b.png", _png(130, 70, seed=98))
    store.write_bytes("q/c.png", _png(50, 100, value=255))  # a flat white image: far from the bank
    res = _score(model, store, ["q/a.png", "q/b.png", "q/c.png"])
    assert [r.error for r in res] == [None] * 3
    assert [r.amap.shape for r in res] == [(50, 100), (130, 70), (50, 100)]  # the stored image's pixels
    assert res[2].score > max(res[0].score, res[1].score)
    for r in res:  # the image score is the maximum patch score; the smoothed map peaks no higher
        assert r.stats.map_max <= r.score + 1e-4


def test_tiled_score_is_the_max_of_the_stitched_grid(tmp_path):
    from patchaudit.workers.features import to_tensor_batch
    from patchaudit.workers.pipeline import _tiles_of

    store = _write_set(tmp_path / "d", [(64, 64)])
    model = _fit(store, geometry="tile", tile_overlap=0.5)
    store.write_bytes("q/big.png", _png(128, 160, seed=7))
    (r,) = _score(model, store, ["q/big.png"])
    from patchaudit.workers.decode import decode_image as dec

    px = dec(store.read_bytes("q/big.png"), model.preprocess).pixels
    boxes, tiles = _tiles_of(model, px)
    assert len(boxes) == 3 * 4  # starts 0/32/64 by 0/32/64/96
    with torch.inference_mode():
        x = to_tensor_batch(list(tiles), model.backbone.mean, model.backbone.std)
        grids = model.score_embeddings(model.embed(x)).grid_maps
    want = float(stitch(grids, boxes, 64 // grids.shape[1], px.shape[:2]).max())
    assert r.score == pytest.approx(want, rel=1e-5)


def test_padim_fitted_on_one_shape_refuses_another_with_a_clear_error_row(tmp_path):
    store = _write_set(tmp_path / "d", [(48, 96)])
    model = _fit(store, method="padim", geometry="aspect", layers=[1, 2], padim={"n_features": 20})
    store.write_bytes("q/same.png", _png(50, 100, seed=3))
    store.write_bytes("q/tall.png", _png(100, 50, seed=4))
    same, tall = _score(model, store, ["q/same.png", "q/tall.png"])
    assert same.error is None and same.amap.shape == (50, 100)
    assert tall.score is None and "fitted on a" in tall.error and "one input shape" in tall.error


def test_padim_aspect_fit_on_mixed_shapes_is_refused(tmp_path):
    store = _write_set(tmp_path / "d", [(48, 96), (96, 48)])
    with pytest.raises(PatchauditError, match="same input shape"):
        _fit(store, method="padim", geometry="aspect", layers=[1, 2], padim={"n_features": 20})


def test_manifest_records_the_geometry_and_load_keeps_it(tmp_path):
    from patchaudit.workers.model import load_model

    store = _write_set(tmp_path / "d", [(48, 96)])
    model = _fit(store, geometry="tile", tile_overlap=0.5, tile_scale=2.0)
    model.save(str(tmp_path / "m"))
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["geometry"] == {
        "mode": "tile",
        "tile_size": 64,
        "tile_overlap": 0.5,
        "tile_scale": 2.0,
        "stitch": "mean of overlapping tiles on the patch grid",
    }
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert loaded.preprocess == model.preprocess
    store.write_bytes("q/a.png", _png(50, 100, seed=5))
    (a,) = _score(model, store, ["q/a.png"])
    (b,) = _score(loaded, store, ["q/a.png"])
    assert b.score == pytest.approx(a.score, rel=1e-4)


def test_a_config_asking_for_another_geometry_than_the_models_is_refused(tmp_path):
    from patchaudit.scheduler import cli
    from patchaudit.workers.geometry import check_same_geometry

    manifest = {
        "config": {
            "geometry": "tile",
            "tile_size": 256,
            "tile_overlap": 0.25,
            "tile_scale": 1.0,
            "image_size": [256, 256],
        }
    }
    check_same_geometry(model_config_from_dict({"geometry": "tile"}), manifest, "c.yaml")  # the same: fine
    check_same_geometry(model_config_from_dict({"geometry": "tile", "image_size": [128, 128]}), manifest, "c.yaml")
    with pytest.raises(ConfigError, match="geometry 'squash' \\(model: 'tile'\\)"):
        check_same_geometry(model_config_from_dict({}), manifest, "c.yaml")
    with pytest.raises(ConfigError, match="tile_scale 0.5"):
        check_same_geometry(model_config_from_dict({"geometry": "tile", "tile_scale": 0.5}), manifest, "c.yaml")
    old = {"config": {"image_size": [256, 256], "center_crop": None}}  # a manifest from before geometries
    check_same_geometry(model_config_from_dict({}), old, "c.yaml")
    with pytest.raises(ConfigError, match="aspect"):
        check_same_geometry(model_config_from_dict({"geometry": "aspect"}), old, "c.yaml")
    # through the CLI: one clear line, exit status 2, before any scoring
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "c.yaml").write_text("model:\n  geometry: aspect\n")
    rc = cli.main(
        [
            "score",
            "--input",
            str(tmp_path),
            "--model",
            str(tmp_path / "m"),
            "--report",
            str(tmp_path / "r"),
            "--config",
            str(tmp_path / "c.yaml"),
            "--single-process",
        ]
    )
    assert rc == 2 and not (tmp_path / "r").exists()
