"""Tests for workers.decode: every bad input becomes a DecodeError that says why; good inputs decode right."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from patchaudit.errors import PatchauditError
from patchaudit.workers.decode import DEFAULT_MAX_PIXELS, DecodedImage, DecodeError, Preprocess, decode_image

# --------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def png_with_header(width: int, height: int) -> bytes:
    """A well-formed 8-bit grayscale PNG whose IHDR claims width x height but whose data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # depth 8, colour type 0 (gray)
    idat = zlib.compress(b"\x00" * 64)  # filter byte + a few pixels of the first row only
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def tiff_with_entry_type(tag: int, new_type: int) -> bytes:
    """A small valid little-endian TIFF with the field type of one IFD entry rewritten (a hostile header)."""
    data = bytearray(encode(Image.fromarray(noise_rgb(12, 10)), "TIFF"))
    assert data[:4] == b"II*\x00"  # test-helper sanity, not input validation
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == tag:
            struct.pack_into("<H", data, entry + 2, new_type)
            return bytes(data)
    raise LookupError(f"tag {tag} not in the test TIFF")


PREP = Preprocess(image_size=(32, 32))


def decode_error(data: bytes, prep: Preprocess = PREP, **kw) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, prep, **kw)
    msg = str(info.value)
    assert msg, "a DecodeError must carry a reason"
    return msg


# --------------------------------------------------------------------------- bad inputs


def test_decode_error_is_a_patchaudit_error():
    assert issubclass(DecodeError, PatchauditError)


def test_zero_bytes():
    assert "empty" in decode_error(b"")


def test_random_garbage():
    garbage = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert "not an image" in decode_error(garbage)


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"  # an image extension does not make it an image
    path.write_text("lot 42 inspected by night shift\n" * 20)
    assert "not an image" in decode_error(path.read_bytes())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt):
    data = encode(Image.fromarray(noise_rgb(64, 64)), fmt)
    decode_image(data, PREP)  # the whole file decodes ...
    msg = decode_error(data[: len(data) // 2])  # ... half of it does not
    assert "truncated" in msg


@pytest.mark.parametrize("cut", [8, 20, 40])
def test_png_cut_inside_header(cut):
    data = encode(Image.fromarray(noise_rgb(8, 8)), "PNG")
    decode_error(data[:cut])


@pytest.mark.parametrize("field_type", [12, 16])  # DOUBLE, LONG8 instead of LONG
def test_hostile_tiff_strip_offsets(field_type):
    # StripOffsets (tag 273) as a float or a 64-bit giant: Pillow raises TypeError/OverflowError from
    # deep inside load(); the contract is that only DecodeError leaves decode_image.
    data = tiff_with_entry_type(273, field_type)
    assert "corrupt" in decode_error(data)


def test_larger_than_max_pixels():
    data = encode(Image.fromarray(noise_rgb(100, 120)), "PNG")
    assert decode_image(data, PREP, max_pixels=100 * 120).original_size == (100, 120)  # at the limit: fine
    msg = decode_error(data, max_pixels=100 * 120 - 1)
    assert "too large" in msg and "120x100" in msg and str(100 * 120 - 1) in msg


def test_header_claims_giant_size():
    data = png_with_header(200_000, 150_000)  # 3e10 pixels claimed by a file of ~100 bytes
    assert len(data) < 200
    assert "too large" in decode_error(data)  # rejected from the header, nothing allocated


def test_header_over_small_limit():
    msg = decode_error(png_with_header(5000, 4000), max_pixels=1_000_000)
    assert "too large" in msg and "5000x4000" in msg and "1000000" in msg


def test_max_pixels_is_the_limit_not_pillows_default():
    # 95 MP is under our 100 MP default but over Pillow's own bomb warning limit (~89.5 MP): the size
    # check must pass and the (truncated) file fail as corrupt, not as "too large".
    w, h = 10_000, 9_500
    assert Image.MAX_IMAGE_PIXELS < w * h <= DEFAULT_MAX_PIXELS
    msg = decode_error(png_with_header(w, h))
    assert "too large" not in msg and "truncated" in msg


# --------------------------------------------------------------------------- modes


def test_16bit_grayscale_absolute_scaling():
    raw = np.array([[0, 257, 65535, 1000, 32768, 128]], dtype=np.uint16)  # (1, 6)
    img = Image.fromarray(raw)
    assert img.mode == "I;16"
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
    out = decode_image(data, Preprocess(image_size=(1, 6)))
    assert out.pixels.shape == (1, 6, 3) and out.pixels.dtype == np.uint8
    # Absolute scaling (v / 257), not per-image min-max: a dim frame stays dim.
    expected = np.rint(raw / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out.pixels[..., 0], expected)
    assert out.pixels[0, 2, 0] == 255 and out.pixels[0, 3, 0] == 4
    np.testing.assert_array_equal(out.pixels[..., 0], out.pixels[..., 2])  # gray in all channels


def test_16bit_dim_image_is_not_stretched():
    raw = np.full((4, 4), 1000, dtype=np.uint16)
    raw[0, 0] = 2000
    out = decode_image(encode(Image.fromarray(raw), "PNG"), Preprocess(image_size=(4, 4)))
    assert out.pixels.max() == 8 and out.pixels.min() == 4  # min-max scaling would give 255 and 0


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [
        ((0, 0, 0, 0), (255, 255, 255)),
        ((255, 0, 0, 0), (0, 255, 255)),
        ((0, 255, 0, 0), (255, 0, 255)),
        ((0, 0, 0, 255), (0, 0, 0)),
    ],
)
def test_cmyk_jpeg(cmyk, rgb):
    data = encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, Preprocess(image_size=(16, 16)))
    assert out.pixels.shape == (16, 16, 3)
    np.testing.assert_allclose(out.pixels[8, 8].astype(int), rgb, atol=6)


def test_rgba_png_drops_alpha():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = np.arange(8, dtype=np.uint8)[None, :] * 30  # alpha varies, colour must not
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), Preprocess(image_size=(8, 8)))
    assert np.all(out.pixels == np.array([10, 200, 30], dtype=np.uint8))


def test_palette_png():
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(idx, "L").convert("P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data, Preprocess(image_size=(2, 2)))
    np.testing.assert_array_equal(out.pixels[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out.pixels[0, 1], [0, 255, 0])
    np.testing.assert_array_equal(out.pixels[1, 0], [0, 0, 255])


def test_one_bit_image():
    bits = np.zeros((4, 6), dtype=bool)
    bits[1, 2] = bits[3, 5] = True
    data = encode(Image.fromarray(bits), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    out = decode_image(data, Preprocess(image_size=(4, 6)))
    np.testing.assert_array_equal(out.pixels[..., 1], bits.astype(np.uint8) * 255)


def test_exif_rotated_jpeg():
    # Stored 40 high x 60 wide, white marker block in the stored top-left corner, orientation 6
    # ("rotate 90 degrees clockwise to display"): displayed 60 high x 40 wide, marker top-right.
    stored = np.zeros((40, 60, 3), dtype=np.uint8)
    stored[:10, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    out = decode_image(data, Preprocess(image_size=(60, 40)))  # no resize: compare pixel positions
    assert out.original_size == (60, 40)
    px = out.pixels[..., 0].astype(int)
    assert px[:8, -8:].min() > 200  # marker top-right
    for corner in (px[:8, :8], px[-8:, :8], px[-8:, -8:]):
        assert corner.max() < 60


def test_exif_orientation_1_is_untouched():
    exif = Image.Exif()
    exif[0x0112] = 1
    data = encode(Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)), "JPEG", exif=exif)
    assert decode_image(data, PREP).original_size == (40, 60)


# --------------------------------------------------------------------------- preprocessing


def test_resize_to_image_size():
    img = np.zeros((30, 50, 3), dtype=np.uint8)
    img[:] = (90, 140, 220)
    out = decode_image(encode(Image.fromarray(img), "PNG"), Preprocess(image_size=(64, 48)))
    assert isinstance(out, DecodedImage)
    assert out.original_size == (30, 50)  # (height, width) of the stored image
    assert out.pixels.shape == (64, 48, 3) and out.pixels.dtype == np.uint8
    assert out.pixels.flags["C_CONTIGUOUS"]
    assert np.all(out.pixels == np.array([90, 140, 220], dtype=np.uint8))


def test_resize_keeps_layout():
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[:, :40] = 255  # left half white
    out = decode_image(encode(Image.fromarray(img), "PNG"), Preprocess(image_size=(20, 20)))
    assert out.pixels[:, :9].min() == 255 and out.pixels[:, 11:].max() == 0


def test_no_resize_is_lossless():
    img = noise_rgb(32, 32, seed=3)
    out = decode_image(encode(Image.fromarray(img), "PNG"), PREP)
    np.testing.assert_array_equal(out.pixels, img)


def test_center_crop():
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.stack([yy, xx, (yy + xx) % 256], axis=-1).astype(np.uint8)  # every pixel knows where it is
    prep = Preprocess(image_size=(64, 64), center_crop=(32, 48))
    assert prep.input_size == (32, 48)
    out = decode_image(encode(Image.fromarray(img), "PNG"), prep)
    assert out.pixels.shape == (32, 48, 3) and out.pixels.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out.pixels, img[16:48, 8:56])  # top (64-32)//2, left (64-48)//2
    assert out.original_size == (64, 64)


def test_crop_after_resize():
    img = np.zeros((100, 100, 3), dtype=np.uint8)
    img[25:75, 25:75] = 255  # white centre square, half the side
    data = encode(Image.fromarray(img), "PNG")
    full = decode_image(data, Preprocess(image_size=(40, 40)))
    assert full.pixels.shape == (40, 40, 3) and full.pixels.min() == 0
    out = decode_image(data, Preprocess(image_size=(40, 40), center_crop=(12, 12)))
    # the square spans rows/cols 10..30 of the 40x40 resize (edges blurred by the resize filter);
    # the crop spans 14..26, so it sees only white
    assert out.pixels.shape == (12, 12, 3) and out.pixels.min() == 255
