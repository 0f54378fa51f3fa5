"""benchmarks/decoders.py: a whole run on a few real images; the exact decoders report zero pixel difference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_scripts import load_benchmark

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
BOTTLE = DATA / "mvtec_ad" / "bottle"
TILES = DATA / "magnetic_tile" / "magnetic_tile"


@pytest.mark.skipif(not BOTTLE.is_dir() or not TILES.is_dir(), reason="shared images not present")
def test_run_reports_every_decoder(tmp_path):
    bench = load_benchmark("decoders.py")
    out = tmp_path / "dec.json"
    assert (
        bench.main(
            [
                "--data",
                str(BOTTLE),
                "--tiles",
                str(TILES),
                "--images",
                "1",
                "--large",
                "0",
                "--reps",
                "1",
                "--size",
                "64",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    sets = json.loads(out.read_text())["sets"]
    assert set(sets) == {"bottle PNG 900x900", "magnetic tile JPEG"}
    png, jpg = sets["bottle PNG 900x900"]["decoders"], sets["magnetic tile JPEG"]["decoders"]
    assert {"pillow", "fast"} <= set(png) and {"pillow", "draft"} <= set(jpg)
    assert png["fast"]["max_abs_diff"] == 0 and png["pillow"]["speedup"] == 1.0
    for row in (*png.values(), *jpg.values()):
        assert row["cpu_ms"] > 0 and row["speedup"] > 0


def test_large_copies_are_3000x2000(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(path)
    bench = load_benchmark("decoders.py")
    (data,) = bench.large_copies([path], 1, "JPEG")
    assert Image.open(io.BytesIO(data)).size == (3000, 2000)
