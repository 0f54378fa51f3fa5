"""`bench --geometry`: the grid sweeps input geometries, rows and the report show them."""

from __future__ import annotations

import pytest

from patchaudit.bench import runner as bench
from patchaudit.bench.runner import expand_grid, run_bench
from patchaudit.errors import ConfigError
from patchaudit.workers.config import ModelConfig

from test_bench import DATA, FakeRunner, _png


def test_grid_sweeps_geometries_with_the_size_as_the_side_the_backbone_sees():
    base = ModelConfig(tile_scale=0.5, tile_overlap=0.5)
    grid = expand_grid(base, ["patchcore", "gaussian"], ["tf_efficientnet_lite0"], [224], [0.1],
                       geometries=["squash", "aspect", "tile"])
    assert len(grid) == 6 and len({c.config_id for c in grid}) == 6
    by_label = {c.label: c.model for c in grid}
    assert set(by_label) == {
        "patchcore/tf_efficientnet_lite0/224/c0.1", "patchcore/tf_efficientnet_lite0/224/c0.1/aspect",
        "patchcore/tf_efficientnet_lite0/224/c0.1/tile@0.5x", "gaussian/tf_efficientnet_lite0/224",
        "gaussian/tf_efficientnet_lite0/224/aspect", "gaussian/tf_efficientnet_lite0/224/tile@0.5x",
    }
    aspect = by_label["patchcore/tf_efficientnet_lite0/224/c0.1/aspect"]
    assert aspect.geometry == "aspect" and aspect.image_size == (224, 224)
    tile = by_label["patchcore/tf_efficientnet_lite0/224/c0.1/tile@0.5x"]
    assert (tile.geometry, tile.tile_size, tile.tile_scale, tile.tile_overlap) == ("tile", 224, 0.5, 0.5)
    # the default sweeps squash only: the grid of a bench without --geometry is unchanged
    assert [c.model.geometry for c in expand_grid(base, ["padim"], ["x"], [256], [0.1])] == ["squash"]


@pytest.mark.parametrize("geometries, sizes, match", [
    (["letterbox"], [256], "--geometry: 'letterbox' is not valid"),
    (["tile"], [250], "multiples of 32"),
])
def test_grid_geometry_errors(geometries, sizes, match):
    with pytest.raises(ConfigError, match=match):
        expand_grid(ModelConfig(), ["patchcore"], ["x"], sizes, [0.1], geometries=geometries)


def test_rows_and_report_show_the_geometry(tmp_path):
    grid = expand_grid(ModelConfig(), ["patchcore", "padim"], ["tf_efficientnet_lite0"], [256], [0.1],
                       geometries=["squash", "aspect", "tile"])
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
    rc = cli.main(["bench", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "patchcore",
                   "--geometry", "squash,aspect,tile"])
    assert rc == 0 and [c.model.geometry for c in seen["grid"]] == ["squash", "aspect", "tile"]
    assert cli.main(["bench", "--data", str(tmp_path), "--geometry", "stretch"]) == 2
    assert "'stretch' is not valid" in capsys.readouterr().err
