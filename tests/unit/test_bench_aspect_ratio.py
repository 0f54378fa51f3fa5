"""benchmarks/aspect_ratio.py: letterbox geometry, inside cells, and the stretch map equal to the product's."""

from __future__ import annotations

import numpy as np
import pytest
from bench_scripts import load_benchmark

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("aspect_ratio.py")


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_the_given_colour(bench):
    wide = PIL.new("RGB", (400, 100), (255, 0, 0))  # PIL size is (width, height)
    pixels, box = bench.place(wide, (256, 256), "letterbox", (1, 2, 3))
    assert pixels.shape == (256, 256, 3) and box == (96, 0, 64, 256)
    assert (pixels[0, 0] == (1, 2, 3)).all() and (pixels[128, 128] == (255, 0, 0)).all()
    tall = PIL.new("RGB", (50, 200))
    assert bench.place(tall, (256, 256), "letterbox", (0, 0, 0))[1] == (0, 96, 256, 64)
    pixels, box = bench.place(wide, (256, 256), "stretch", (0, 0, 0))
    assert pixels.shape == (256, 256, 3) and box == (0, 0, 256, 256)


def test_inside_cells_are_those_whose_centre_is_on_the_image(bench):
    cells = bench.inside_cells((96, 0, 64, 256), (256, 256), (32, 32))  # stride 8
    assert cells.shape == (32, 32)
    assert cells[:, 0].nonzero()[:, 0].tolist() == list(range(12, 20))  # rows 96..159
    assert cells.all(0).sum() == 0 and cells.any(0).all()


def test_stretch_map_equals_the_pipelines(bench):
    from patchaudit.workers.maps import smooth_maps, to_original

    grid = torch.rand(32, 32, generator=torch.Generator().manual_seed(0))
    got = bench.grid_to_map(grid, (0, 0, 256, 256), (256, 256), 4.0, (300, 200))
    want = to_original(smooth_maps(grid[None], (256, 256), 4.0)[0], (300, 200), (256, 256), None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # letterbox: outside cells never reach the map, however high they score
    boxed = grid.clone()
    inside = bench.inside_cells((96, 0, 64, 256), (256, 256), (32, 32))
    boxed[~inside] = 1e6
    amap = bench.grid_to_map(boxed, (96, 0, 64, 256), (256, 256), 4.0, (100, 400))
    assert amap.shape == (100, 400) and amap.max() <= grid.max() + 1e-5
