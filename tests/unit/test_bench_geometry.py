"""`bench --geometry`: the grid sweeps input geometries, rows and the report show them."""

from __future__ import annotations

import pytest
from test_bench import DATA, FakeRunner, _png

from patchaudit.bench import runner as bench
from patchaudit.bench.runner import expand_grid, run_bench
from patchaudit.errors import ConfigError
from patchaudit.workers.config import ModelConfig


def test_grid_sweeps_geometries_with_the_size_as_the_side_the_backbone_sees():
    base = ModelConfig(tile_scale=0.5, tile_overlap=0.5)
    grid = expand_grid(
        base,
        ["patchcore", "gaussian"],
        ["tf_efficientnet_lite0"],
        [224],
        [0.1],
        geometries=["squash", "aspect", "tile"],
    )
    assert len(grid) == 6 and len({c.config_id for c in grid}) == 6
    by_label = {c.label: c.model for c in grid}
    assert set(by_label) == {
        "patchcore/tf_efficientnet_lite0/224/c0.1",
        "patchcore/tf_efficientnet_lite0/224/c0.1/aspect",
        "patchcore/tf_efficientnet_lite0/224/c0.1/tile@0.5x",
        "gaussian/tf_efficientnet_lite0/224",
        "gaussian/tf_efficientnet_lite0/224/aspect",
        "gaussian/tf_efficientnet_lite0/224/tile@0.5x",
    }
    aspect = by_label["patchcore/tf_efficientnet_lite0/224/c0.1/aspect"]
    assert aspect.geometry == "aspect" and aspect.image_size == (224, 224)
    tile = by_label["patchcore/tf_efficientnet_lite0/224/c0.1/tile@0.5x"]
    assert (tile.geometry, tile.tile_size, tile.tile_scale, tile.tile_overlap) == ("tile", 224, 0.5, 0.5)
    # the default sweeps squash only: the grid of a bench without --geometry is unchanged
    assert [c.model.geometry for c in expand_grid(base, ["padim"], ["x"], [256], [0.1])] == ["squash"]


@pytest.mark.parametrize(
    "geometries, sizes, match",
    [
        (["letterbox"], [256], "--geometry: 'letterbox' is not valid"),
        (["tile"], [250], "multiples of 32"),
    ],
)
def test_grid_geometry_errors(geometries, sizes, match):
    with pytest.raises(ConfigError, match=match):
        expand_grid(ModelConfig(), ["patchcore"], ["x"], sizes, [0.1], geometries=geometries)


def test_rows_and_report_show_the_geometry(tmp_path):
    grid = expand_grid(
        ModelConfig(),
        ["patchcore", "padim"],
        ["tf_efficientnet_lite0"],
        [256],
        [0.1],
        geometries=["squash", "aspect", "tile"],
    )
    summary = run_bench(DATA, tmp_path, grid, runner=FakeRunner(), log=lambda m: None)
    assert sorted(r["geometry"] for r in summary["rows"]) == ["aspect", "aspect", "squash", "squash", "tile", "tile"]
    assert {r["image_size"] for r in summary["rows"]} == {256}  # tile: the tile side
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Input geometry" in html and "pc/lite0/256/c0.1/tile" in html
    for c in grid:
        assert c.label in html
    assert "/aspect" in bench.markdown_table(summary["rows"])


def test_cli_bench_geometry_option(monkeypatch, tmp_path, capsys):
    from patchaudit.scheduler import cli

    seen = {}

    def fake_run_bench(data, out, grid, options):
        seen["grid"] = grid
        return bench.summarize([], data, options)

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    for key in ("train/good/a.png", "test/good/b.png", "test/crack/c.png"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(_png())
    rc = cli.main(
        [
            "bench",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--methods",
            "patchcore",
            "--geometry",
            "squash,aspect,tile",
        ]
    )
    assert rc == 0 and [c.model.geometry for c in seen["grid"]] == ["squash", "aspect", "tile"]
    assert cli.main(["bench", "--data", str(tmp_path), "--geometry", "stretch"]) == 2
    assert "'stretch' is not valid" in capsys.readouterr().err


def test_geometry_benchmark_makes_wide_halves_with_their_masks(tmp_path):
    import numpy as np
    from bench_scripts import load_benchmark
    from PIL import Image

    geo = load_benchmark("geometry.py")
    src = tmp_path / "bottle"
    for key in ("train/good/000.png", "test/good/000.png", "test/broken/000.png"):
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(src / key)
    mask = np.zeros((40, 40), np.uint8)
    mask[30:35, 5:10] = 255  # the defect lies in the bottom half
    (src / "ground_truth/broken").mkdir(parents=True)
    Image.fromarray(mask).save(src / "ground_truth/broken/000_mask.png")
    out = geo.make_wide_bottle(src, tmp_path / "wide")
    for key in ("train/good/000.png", "test/good/000.png", "test/broken/000.png"):
        assert Image.open(out / key).size == (40, 20)  # width x height: a 2:1 half
    half = np.asarray(Image.open(out / "ground_truth/broken/000_mask.png"))
    assert half.shape == (20, 40) and (half > 0).sum() == 25  # the half holding the whole defect

    class T:
        def __init__(self, key, defect_type):
            self.key, self.defect_type = key, defect_type

    items = [T(f"{d}/{i:03d}", d) for d, n in (("good", 30), ("crack", 90)) for i in range(n)]
    sub = geo.test_subset(items, 40, seed=0)
    assert len(sub) == 40 and sum(t.defect_type == "good" for t in sub) == 10
    assert [t.key for t in sub] == [t.key for t in geo.test_subset(items, 40, seed=0)]  # seeded
    assert geo.test_subset(items, None) == items
