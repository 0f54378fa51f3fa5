"""png_fast: the same pixels as Pillow for every plain PNG, and None (Pillow decides) for everything else."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from patchaudit.workers import png_fast
from patchaudit.workers.decode import DecodeError, Preprocess, decode_image

pytestmark = pytest.mark.skipif(not png_fast.available(), reason="pyspng/isal not installed")

BOTTLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "mvtec_ad" / "bottle" / "test" / "broken_large"


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def noise(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c == 1 else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def insert_chunk(data: bytes, tag: bytes, payload: bytes) -> bytes:
    """Put a chunk right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return data[:33] + chunk(tag, payload) + data[33:]


def both(data: bytes, prep: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    fast = decode_image(data, prep)
    slow = decode_image(data, Preprocess(prep.image_size, prep.center_crop, fast_png=False))
    assert fast.original_size == slow.original_size
    return fast.pixels, slow.pixels


def palette_image(h: int, w: int) -> Image.Image:
    img = Image.fromarray(noise(h, w, 1, seed=3) % 40, mode="L").convert("P")
    img.putpalette(list(noise(1, 40 * 3, 1, seed=4).ravel()))
    return img


CASES = {
    "rgb": lambda: Image.fromarray(noise(37, 53, 3), "RGB"),
    "rgba": lambda: Image.fromarray(noise(37, 53, 4), "RGBA"),
    "gray": lambda: Image.fromarray(noise(37, 53, 1), "L"),
    "gray_alpha": lambda: Image.fromarray(noise(37, 53, 2), "LA"),
    "palette": lambda: palette_image(37, 53),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("size", [(16, 24), (37, 53), (64, 64)])  # down, none, up
def test_identical_to_pillow_for_every_colour_type(case, size):
    data = png(CASES[case]())
    assert png_fast.decode_png(data, 10**8) is not None, "the plain case must take the fast path"
    fast, slow = both(data, Preprocess(image_size=size))
    assert fast.dtype == np.uint8 and fast.shape == (*size, 3)
    np.testing.assert_array_equal(fast, slow)


def test_palette_with_transparency_and_center_crop():
    img = palette_image(40, 30)
    data = png(img, transparency=5)
    assert b"tRNS" in data and png_fast.decode_png(data, 10**8) is not None
    fast, slow = both(data, Preprocess(image_size=(32, 32), center_crop=(20, 12)))
    np.testing.assert_array_equal(fast, slow)


def test_many_idat_chunks_and_big_rows():
    # > 65535 bytes of scanlines: several stored blocks; Pillow splits IDAT into chunks of 64 KiB
    data = png(Image.fromarray(noise(150, 300, 3), "RGB"))
    assert data.count(b"IDAT") > 1
    fast, slow = both(data, Preprocess(image_size=(64, 80)))
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.skipif(not BOTTLE.is_dir(), reason="shared bottle images not present")
def test_real_bottle_images_identical():
    for path in sorted(BOTTLE.glob("*.png"))[:2]:
        data = path.read_bytes()
        assert png_fast.decode_png(data, 10**8) is not None
        fast, slow = both(data, Preprocess(image_size=(256, 256)))
        np.testing.assert_array_equal(fast, slow)


# --------------------------------------------------------------------------- not the plain case: Pillow decides


def not_plain(data: bytes) -> None:
    assert png_fast.decode_png(data, 10**8) is None


def test_16bit_and_low_bit_depths_go_to_pillow():
    not_plain(png(Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)))
    not_plain(png(Image.fromarray(noise(8, 8, 1) > 128)))  # 1-bit


def test_interlaced_goes_to_pillow():
    img = Image.fromarray(noise(8, 8, 3), "RGB")
    raw = b"".join(b"\x00" + img.tobytes()[r * 24 : (r + 1) * 24] for r in range(8))  # not valid Adam7; never read
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 1)
    not_plain(png_fast.PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_orientation_carriers_go_to_pillow():
    data = png(Image.fromarray(noise(8, 8, 3), "RGB"))
    not_plain(insert_chunk(data, b"eXIf", b"MM\x00*\x00\x00\x00\x08\x00\x00"))
    not_plain(insert_chunk(data, b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00<x tiff:Orientation='6'/>"))
    not_plain(insert_chunk(data, b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + zlib.compress(b"<x/>")))
    not_plain(insert_chunk(data, b"zTXt", b"Raw profile type exif\x00\x00" + zlib.compress(b"x")))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "lot 42")  # an ordinary text chunk changes nothing, nor XMP without orientation
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta><rdf:Description tiff:Make='cam'/></x:xmpmeta>")
    assert png_fast.decode_png(png(Image.fromarray(noise(8, 8, 3), "RGB"), pnginfo=info), 10**8) is not None


def test_png_rotated_by_xmp_decodes_rotated():
    img = Image.fromarray(noise(10, 20, 3), "RGB")
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    out = decode_image(png(img, pnginfo=info), Preprocess(image_size=(20, 10)))
    assert out.original_size == (20, 10)
    np.testing.assert_array_equal(out.pixels, np.asarray(img.transpose(Image.Transpose.ROTATE_270)))


def test_png_rotated_by_exif_decodes_rotated():
    img = Image.fromarray(noise(10, 20, 3), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    data = png(img, exif=exif.tobytes())
    out = decode_image(data, Preprocess(image_size=(20, 10)))
    assert out.original_size == (20, 10)
    np.testing.assert_array_equal(out.pixels, np.asarray(img.transpose(Image.Transpose.ROTATE_270)))


def test_broken_files_go_to_pillow_and_fail_the_same_way():
    data = png(Image.fromarray(noise(64, 64, 3), "RGB"))
    bad_crc = bytearray(data)
    bad_crc[40] ^= 0xFF  # inside the first IDAT payload
    not_plain(bytes(bad_crc))
    not_plain(data[: len(data) // 2])
    for broken in (data[: len(data) // 2], data[:20]):
        with pytest.raises(DecodeError) as fast:
            decode_image(broken, Preprocess(image_size=(32, 32)))
        with pytest.raises(DecodeError) as slow:
            decode_image(broken, Preprocess(image_size=(32, 32), fast_png=False))
        assert str(fast.value) == str(slow.value)


def test_stream_longer_than_the_header_allows_is_not_inflated():
    # A 4x4 gray header over a zlib stream of 50 MB of zeros (a small file): inflate stops at the limit.
    ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0)
    bomb = zlib.compress(b"\x00" * 50_000_000, 9)
    assert len(bomb) < 100_000
    not_plain(png_fast.PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bomb) + chunk(b"IEND", b""))


def test_over_max_pixels_goes_to_pillow_for_the_message():
    data = png(Image.fromarray(noise(10, 12, 3), "RGB"))
    assert png_fast.decode_png(data, 119) is None
    with pytest.raises(DecodeError, match="too large"):
        decode_image(data, Preprocess(image_size=(8, 8)), max_pixels=119)
