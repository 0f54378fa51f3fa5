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

pytestmark = pytest.mark.skipif(not png_fast.available(), reason="pyspng/deflate not installed")

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


# --------------------------------------------------------------------------- the native path itself


def test_the_c_functions_load_from_the_pinned_wheels():
    # available() is False when the wheels are missing (every file then skips); installed, the libraries'
    # C functions must load, or every PNG would silently take the slow path.
    zlib, spng = png_fast._LIBS
    assert zlib.libdeflate_zlib_decompress_ex and spng.spng_decode_image


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("size", [(16, 24), (37, 53), (64, 64)])
def test_torch_resize_identical_after_either_decoder(case, size):
    # With resize: torch the fast decoder's RGB (or gray) buffer and Pillow's RGB resize to the same values.
    data = png(CASES[case]())
    assert png_fast.decode_png(data, 10**8, rgbx=False) is not None, "the plain case must take the fast path"
    fast = decode_image(data, Preprocess(image_size=size, resize="torch")).pixels
    slow = decode_image(data, Preprocess(image_size=size, resize="torch", fast_png=False)).pixels
    assert fast.dtype == np.uint8 and fast.shape == (*size, 3)
    np.testing.assert_array_equal(fast, slow)


def test_torch_resize_within_one_level_of_pillow():
    data = png(Image.fromarray(noise(300, 200, 3), "RGB"))
    for size in [(256, 256), (64, 64), (224, 320)]:
        torch_px = decode_image(data, Preprocess(image_size=size, resize="torch")).pixels.astype(int)
        pillow_px = decode_image(data, Preprocess(image_size=size)).pixels.astype(int)
        assert np.abs(torch_px - pillow_px).max() <= 1


def test_trailing_bytes_after_the_zlib_stream_go_to_pillow():
    img = Image.fromarray(noise(8, 8, 3), "RGB")
    raw = b"".join(b"\x00" + img.tobytes()[r * 24 : (r + 1) * 24] for r in range(8))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    good = png_fast.PNG_SIGNATURE + ihdr + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    np.testing.assert_array_equal(png_fast.decode_png(good, 10**8)[:, :, :3], np.asarray(img))
    not_plain(png_fast.PNG_SIGNATURE + ihdr + chunk(b"IDAT", zlib.compress(raw) + b"junk") + chunk(b"IEND", b""))
    not_plain(png_fast.PNG_SIGNATURE + ihdr + chunk(b"IDAT", zlib.compress(raw[:-1])) + chunk(b"IEND", b""))


def test_results_never_share_the_reused_buffers():
    # The thread's buffers are reused: a result (resized or not, RGB or gray) must not change with the next decode.
    a, b = png(Image.fromarray(noise(32, 32, 3, seed=1), "RGB")), png(Image.fromarray(noise(32, 32, 3, seed=2), "RGB"))
    for prep in (Preprocess(image_size=(32, 32)), Preprocess(image_size=(16, 16), resize="torch")):
        first = decode_image(a, prep).pixels
        kept = first.copy()
        decode_image(b, prep)
        np.testing.assert_array_equal(first, kept)
    first = png_fast.decode_png(a, 10**8)
    kept = first.copy()
    png_fast.decode_png(b, 10**8)
    np.testing.assert_array_equal(first, kept)


def test_threads_decode_with_their_own_buffers():
    from concurrent.futures import ThreadPoolExecutor

    datas = [png(Image.fromarray(noise(40 + i, 50, 3, seed=i), "RGB")) for i in range(16)]
    prep = Preprocess(image_size=(24, 24))
    expected = [decode_image(d, Preprocess(image_size=(24, 24), fast_png=False)).pixels for d in datas]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(lambda d: decode_image(d, prep).pixels, datas), expected):
                np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not BOTTLE.is_dir(), reason="shared bottle images not present")
def test_real_bottle_images_torch_resize():
    for path in sorted(BOTTLE.glob("*.png"))[:2]:
        data = path.read_bytes()
        prep = Preprocess(image_size=(256, 256), resize="torch")
        fast = decode_image(data, prep).pixels
        np.testing.assert_array_equal(
            fast, decode_image(data, Preprocess((256, 256), resize="torch", fast_png=False)).pixels
        )
        pillow = decode_image(data, Preprocess(image_size=(256, 256))).pixels
        assert np.abs(fast.astype(int) - pillow.astype(int)).max() <= 1
