"""workers.decode_stage: a batch decoded as a stage of its own equals the worker's own decode, per geometry."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from patchaudit.errors import ObjectNotFound
from patchaudit.workers.decode import Preprocess
from patchaudit.workers.decode_stage import decode_batch, pack, unpack
from patchaudit.workers.pipeline import decode_many


def _png(h: int, w: int, seed: int, mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(h: int, w: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


FILES = {
    "a.png": _png(90, 90, 0),
    "wide.png": _png(60, 150, 1),
    "gray.png": _png(100, 70, 2, "L"),
    "b.jpg": _jpeg(80, 120, 3),
    "empty.png": b"",
    "text.png": b"not an image at all",
    "tall.jpg": _jpeg(150, 64, 4),
}


def _read(key: str) -> bytes:
    if key == "missing.png":
        raise ObjectNotFound(f"no object {key}")
    return FILES[key]


KEYS = ["a.png", "empty.png", "wide.png", "missing.png", "gray.png", "b.jpg", "text.png", "tall.jpg", "a.png"]

GEOMETRIES = {
    "squash": Preprocess((64, 64)),
    "squash_crop": Preprocess((64, 64), center_crop=(48, 48)),
    "aspect": Preprocess((64, 64), geometry="aspect", stride=16),
    "tile": Preprocess((64, 64), geometry="tile", stride=16, tile_size=64, tile_scale=0.5),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_a_packed_batch_equals_the_workers_decode(name: str) -> None:
    prep = GEOMETRIES[name]
    want = list(decode_many(_read, KEYS, prep, threads=2))
    batch = decode_batch(_read, KEYS, prep, threads=2)
    got = unpack(batch)
    assert [d.key for d in got] == KEYS
    for w, g in zip(want, got):
        assert (w.error is None) == (g.error is None), (w.key, w.error, g.error)
        if w.image is None:
            assert g.error == w.error and g.image is None
            continue
        assert g.image is not None
        assert g.image.original_size == w.image.original_size
        assert g.image.pixels.dtype == np.uint8
        np.testing.assert_array_equal(g.image.pixels, w.image.pixels)
    n_shapes = len({w.image.pixels.shape for w in want if w.image is not None})
    assert len(batch.pixels) == n_shapes  # one array per distinct shape: squash is one array
    if name.startswith("squash"):
        assert len(batch.pixels) == 1 and batch.pixels[0].shape[0] == sum(w.image is not None for w in want)
    assert batch.nbytes == sum(a.nbytes for a in batch.pixels)


def test_errors_travel_as_text() -> None:
    got = unpack(decode_batch(_read, ["empty.png", "missing.png", "text.png"], Preprocess((32, 32))))
    assert [g.image for g in got] == [None, None, None]
    assert "empty" in (got[0].error or "")
    assert (got[1].error or "").startswith("read failed")
    assert "not an image" in (got[2].error or "")


def test_an_all_error_or_empty_batch_packs() -> None:
    assert unpack(pack([])) == []
    batch = decode_batch(_read, ["empty.png"], Preprocess((32, 32)))
    assert batch.pixels == () and batch.errors[0]
