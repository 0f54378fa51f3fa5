"""Preprocess.jpeg_draft: reduced-scale JPEG decode keeps the contract (size, orientation, errors)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from patchaudit.workers.decode import DecodeError, Preprocess, decode_image


def smooth_rgb(h: int, w: int) -> np.ndarray:
    """A smooth image (gradients), so full and reduced-scale decodes agree closely after the resize."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=2).astype(np.uint8)


def jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


DRAFT = Preprocess(image_size=(64, 96), jpeg_draft=True)
FULL = Preprocess(image_size=(64, 96))


def test_draft_decodes_a_large_jpeg_close_to_the_full_decode():
    data = jpeg(smooth_rgb(600, 900))  # 1/4 scale still >= 64x96 (150x225); 1/8 would be 75x112.5 -> also ok
    fast, full = decode_image(data, DRAFT), decode_image(data, FULL)
    assert fast.original_size == full.original_size == (600, 900)  # the stored size, not the decoded one
    assert fast.pixels.shape == full.pixels.shape == (64, 96, 3)
    diff = np.abs(fast.pixels.astype(int) - full.pixels.astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 16


def test_draft_really_reduces_the_decode():
    img = Image.open(io.BytesIO(jpeg(smooth_rgb(600, 900))))
    img.draft(img.mode, (96, 64))
    assert img.size == (113, 75)  # libjpeg's 1/8 scale (rounded up): the decode the option asks for


def test_no_draft_when_the_image_is_not_twice_the_target():
    data = jpeg(smooth_rgb(100, 150))  # 1/2 would be 50x75 < 64x96: full scale, pixels identical
    np.testing.assert_array_equal(decode_image(data, DRAFT).pixels, decode_image(data, FULL).pixels)


def test_draft_respects_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 900 wide x 600 high, displayed 600 wide x 900 high
    data = jpeg(smooth_rgb(600, 900), exif=exif.tobytes())
    prep = Preprocess(image_size=(300, 200), jpeg_draft=True)  # (height, width) in display orientation
    fast, full = decode_image(data, prep), decode_image(data, Preprocess(image_size=(300, 200)))
    assert fast.original_size == full.original_size == (900, 600)
    diff = np.abs(fast.pixels.astype(int) - full.pixels.astype(int))
    assert diff.mean() < 2.0


def test_draft_grayscale_and_center_crop():
    gray = smooth_rgb(512, 512)[:, :, 0]
    data = jpeg(gray)
    prep = Preprocess(image_size=(128, 128), center_crop=(64, 64), jpeg_draft=True)
    out = decode_image(data, prep)
    assert out.pixels.shape == (64, 64, 3) and out.original_size == (512, 512)
    assert (out.pixels[..., 0] == out.pixels[..., 1]).all()


def test_draft_keeps_the_error_contract():
    data = jpeg(smooth_rgb(600, 900))
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], DRAFT)
    with pytest.raises(DecodeError, match="too large"):
        decode_image(data, DRAFT, max_pixels=600 * 900 - 1)
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"", DRAFT)
