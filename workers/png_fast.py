"""Fast PNG decode with exactly Pillow's pixels: libdeflate inflates, then libspng unfilters.

A PNG decode is mostly inflate (zlib) and then unfiltering the scanlines. Pillow does both with zlib and its
own unfilter, libspng (`pyspng`) with zlib and a faster unfilter, and libdeflate inflates whole buffers
about 4x faster than zlib. So we inflate the image data with libdeflate, store the scanlines back into a PNG
without compression (stored deflate blocks: a copy, no work) and let libspng unfilter that. Both libraries
are called through their C APIs (ctypes, on the pinned `deflate` and `pyspng` wheels, which export them):
each thread inflates, copies and decodes into buffers it keeps between images (no fresh pages for the
kernel to fault in and zero, which on a busy VM cost as much as the decode), the GIL is released while
they run, and the pixels land in the array the resize reads. The backbone input is identical, bit for
bit, to the Pillow path's (`tests/unit/test_png_fast.py` checks every colour type).

Only the plain, common case takes this path: 8-bit depth, no interlace, every chunk's CRC right, the zlib
stream exactly as long as the header says with nothing after it, and no chunk that could carry an EXIF or
XMP orientation (those images need `ImageOps.exif_transpose`). Anything else, including every broken
file, returns None and the caller decodes with Pillow, which also writes the error message: hostile input
gets exactly the answers it got before. libdeflate never writes past the buffer it is given (a stream that
inflates to more than the header allows fails), and libspng is handed a PNG we built and checked.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from typing import Any

import numpy as np

try:  # both are pinned dependencies; without them Pillow decodes everything (slower, same pixels)
    import deflate as _deflate
    import pyspng as _spng
except ImportError:  # pragma: no cover - exercised only where the wheels are missing
    _deflate = None  # type: ignore[assignment]
    _spng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that change no pixel and carry no orientation: copied (PLTE, tRNS) or skipped.
_COPIED = {b"PLTE", b"tRNS"}
_HARMLESS = {b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"pHYs", b"sBIT", b"bKGD", b"tIME", b"hIST", b"sPLT"}
_TEXT = {b"tEXt", b"zTXt", b"iTXt"}
# Text keywords Pillow reads an orientation from (Image.getexif): EXIF as hex text, and XMP.
_EXIF_KEYWORD = b"raw profile type exif"
_XMP_KEYWORD = b"xml:com.adobe.xmp"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_STORED_BLOCK = 65535  # largest stored deflate block
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# libspng's output formats (spng.h) and options
_FMT_RGBA8, _FMT_RGB8, _FMT_G8 = 1, 4, 64
_CRC_USE = 2  # chunk CRCs unchecked (we checked the file's; ours are 0), and so is the zlib adler32
_CHUNK_LIMIT = 64 << 20  # libspng's memory limit for ancillary chunks (as pyspng sets it)
# A thread keeps a buffer between images up to this size (bottle's 900x900 RGB needs 2.4 MB a buffer);
# larger images get buffers of their own, freed after them, so a decode thread holds at most ~4x this.
_KEEP_BYTES = 16 << 20


def _native() -> Any:
    """libdeflate's and libspng's C functions from the wheels' extension modules, or None."""
    if _deflate is None or _spng is None:
        return None
    try:
        zlib = ctypes.CDLL(_deflate._deflate.__file__)
        spng = ctypes.CDLL(_spng._pyspng_c.__file__)
    except (OSError, AttributeError):  # pragma: no cover - another build of the wheels
        return None
    vp, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    size_p = ctypes.POINTER(sz)
    for lib, name, res, args in (
        (zlib, "libdeflate_alloc_decompressor", vp, []),
        (zlib, "libdeflate_free_decompressor", None, [vp]),
        (zlib, "libdeflate_zlib_decompress_ex", i, [vp, vp, sz, vp, sz, size_p, size_p]),
        (spng, "spng_ctx_new", vp, [i]),
        (spng, "spng_ctx_free", None, [vp]),
        (spng, "spng_set_crc_action", i, [vp, i, i]),
        (spng, "spng_set_chunk_limits", i, [vp, sz, sz]),
        (spng, "spng_set_png_buffer", i, [vp, vp, sz]),
        (spng, "spng_decoded_image_size", i, [vp, i, size_p]),
        (spng, "spng_decode_image", i, [vp, vp, sz, i, i]),
    ):
        fn = getattr(lib, name, None)
        if fn is None:  # pragma: no cover - the symbols are exported by the pinned wheels
            return None
        fn.restype, fn.argtypes = res, args
    return zlib, spng


_LIBS = _native()


class _Scratch(threading.local):
    """Per-thread buffers reused from one image to the next (see _KEEP_BYTES)."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, nbytes: int) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is not None and buf.size >= nbytes:
            return buf[:nbytes]
        buf = np.empty(max(nbytes, 1), np.uint8)
        if nbytes <= _KEEP_BYTES:
            self.buffers[name] = buf
        return buf[:nbytes]


_SCRATCH = _Scratch()


def available() -> bool:
    return _LIBS is not None


class _NotPlain(Exception):
    """The file is not the plain case this path handles: let Pillow decode it."""


def _parse(data: bytes) -> tuple[bytes, list[bytes], list[memoryview], int, int, int]:
    """Walk the chunks: (IHDR chunk, PLTE/tRNS chunks, IDAT payloads, width, height, colour type)."""
    if not data.startswith(PNG_SIGNATURE):
        raise _NotPlain
    view = memoryview(data)
    pos, end = 8, len(data)
    ihdr = b""
    copied: list[bytes] = []
    idat: list[memoryview] = []
    width = height = ctype = 0
    while True:
        if pos + 12 > end:
            raise _NotPlain  # truncated: Pillow says so
        length, tag = struct.unpack_from(">I4s", data, pos)
        stop = pos + 12 + length
        if stop > end:
            raise _NotPlain
        payload = view[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if _deflate.crc32(payload, _deflate.crc32(tag)) != crc:
            raise _NotPlain
        if not ihdr:
            if tag != b"IHDR" or length != 13:
                raise _NotPlain
            width, height, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", payload)
            if depth != 8 or interlace != 0 or ctype not in _CHANNELS or width == 0 or height == 0:
                raise _NotPlain
            ihdr = bytes(view[pos:stop])
        elif tag == b"IDAT":
            idat.append(payload)
        elif tag == b"IEND":
            break
        elif tag in _COPIED:
            copied.append(bytes(view[pos:stop]))
        elif tag in _TEXT:
            _check_text(tag, bytes(payload))
        elif tag not in _HARMLESS:
            raise _NotPlain  # eXIf (orientation), APNG frames, anything unknown
        pos = stop
    if not idat:
        raise _NotPlain
    return ihdr, copied, idat, width, height, ctype


def _check_text(tag: bytes, payload: bytes) -> None:
    """Text chunks are harmless unless Pillow could read an orientation from them (EXIF, or XMP's)."""
    keyword, _, rest = payload.partition(b"\x00")
    keyword = keyword.lower()
    if keyword == _EXIF_KEYWORD or b"exif" in keyword:
        raise _NotPlain
    if b"xmp" in keyword:
        # Pillow's getexif searches XMP for `tiff:Orientation`; uncompressed iTXt can be searched here,
        # compressed text (zTXt, or iTXt with its compression flag set) is left to Pillow.
        if tag != b"iTXt" or rest[:1] != b"\x00" or b"Orientation" in rest:
            raise _NotPlain


def _address(buf: Any) -> int:
    return int(np.frombuffer(buf, np.uint8).ctypes.data) if len(buf) else 0


def _inflate(zlib: Any, stream: Any, out: np.ndarray) -> None:
    """Inflate the zlib `stream` into `out`, which it must fill exactly, with nothing left over."""
    d = zlib.libdeflate_alloc_decompressor()
    if not d:
        raise MemoryError
    used_in, used_out = ctypes.c_size_t(), ctypes.c_size_t()
    try:
        # libdeflate writes at most out.size bytes (a longer stream fails), checks the adler32, and says
        # how much of the input the stream used: trailing bytes are not the plain case.
        res = zlib.libdeflate_zlib_decompress_ex(
            d, _address(stream), len(stream), out.ctypes.data, out.size, ctypes.byref(used_in), ctypes.byref(used_out)
        )
    finally:
        zlib.libdeflate_free_decompressor(d)
    if res != 0 or used_in.value != len(stream) or used_out.value != out.size:
        raise _NotPlain  # corrupt, too long, truncated, or trailing garbage


def _stored_png(ihdr: bytes, copied: list[bytes], raw: np.ndarray) -> np.ndarray:
    """A PNG whose one IDAT holds `raw` (the filtered scanlines) in stored deflate blocks: one copy of `raw`.

    Its IDAT CRC and zlib adler32 are left 0: libspng runs with both unchecked (SPNG_CRC_USE, as pyspng
    sets it), and the original file's CRCs and adler32 were checked in `_parse` and `_inflate`. Should a
    libspng release check them, the decode fails and Pillow decodes the file: slower, never wrong.
    """
    n = raw.size
    nblocks = max(1, -(-n // _STORED_BLOCK))
    zlen = 2 + 5 * nblocks + n + 4  # zlib header, block headers, data, adler32
    head = b"".join([PNG_SIGNATURE, ihdr, *copied, struct.pack(">I4s", zlen, b"IDAT"), b"\x78\x01"])
    out = _SCRATCH.get("png", len(head) + zlen - 2 + 4 + len(_IEND))
    out[: len(head)] = np.frombuffer(head, np.uint8)
    pos = len(head)
    for i in range(nblocks):
        size = min(_STORED_BLOCK, n - i * _STORED_BLOCK)
        out[pos : pos + 5] = np.frombuffer(struct.pack("<BHH", i == nblocks - 1, size, size ^ 0xFFFF), np.uint8)
        out[pos + 5 : pos + 5 + size] = raw[i * _STORED_BLOCK : i * _STORED_BLOCK + size]
        pos += 5 + size
    out[pos : pos + 8] = 0  # adler32, CRC
    out[pos + 8 :] = np.frombuffer(_IEND, np.uint8)
    return out


def _unfilter(spng: Any, png: np.ndarray, out: np.ndarray, fmt: int) -> None:
    """libspng decodes the stored PNG `png` into `out` (exactly its decoded size in `fmt`)."""
    ctx = spng.spng_ctx_new(0)
    if not ctx:
        raise MemoryError
    size = ctypes.c_size_t()
    try:
        if (
            spng.spng_set_crc_action(ctx, _CRC_USE, _CRC_USE)
            or spng.spng_set_chunk_limits(ctx, _CHUNK_LIMIT, _CHUNK_LIMIT)
            or spng.spng_set_png_buffer(ctx, png.ctypes.data, png.size)
            or spng.spng_decoded_image_size(ctx, fmt, ctypes.byref(size))
            or size.value != out.size
            or spng.spng_decode_image(ctx, out.ctypes.data, out.size, fmt, 0)
        ):
            raise _NotPlain
    finally:
        spng.spng_ctx_free(ctx)


def decode_png(data: bytes, max_pixels: int, rgbx: bool = True, scratch: bool = False) -> np.ndarray | None:
    """Decode a plain 8-bit PNG: with `rgbx`, to (H, W) uint8 gray or (H, W, 4) RGBX; else to (H, W, 3) RGB.

    None: not the plain case, use Pillow. Palettes are expanded and alpha is dropped, as `convert("RGB")`
    does; RGBX's fourth channel (alpha, or 255) is for the caller to ignore: Pillow stores RGB 4 bytes a
    pixel, so it wraps such an array as RGBX without a copy and resizes each channel on its own.
    `scratch`: the array is this thread's reused buffer, valid until its next call (no copy).
    """
    if _LIBS is None:
        return None
    zlib, spng = _LIBS
    try:
        ihdr, copied, idat, width, height, ctype = _parse(data)
        if width * height > max_pixels:
            return None  # Pillow writes the "too large" message
        stride = 1 + width * _CHANNELS[ctype]  # filter byte + one row of samples
        if len(idat) == 1:
            stream: Any = idat[0]
        else:
            stream = _SCRATCH.get("zlib", sum(len(c) for c in idat))
            pos = 0
            for c in idat:
                stream[pos : pos + len(c)] = np.frombuffer(c, np.uint8)
                pos += len(c)
        raw = _SCRATCH.get("raw", height * stride)
        _inflate(zlib, stream, raw)
        png = _stored_png(ihdr, copied, raw)
        # gray stays gray for Pillow's resize (L resized = each channel of RGB resized); torch's resize
        # gets RGB for every image (its kernel for one channel rounds differently from its RGB one)
        fmt, channels = (_FMT_RGB8, 3) if not rgbx else (_FMT_G8, 1) if ctype == 0 else (_FMT_RGBA8, 4)
        out = _SCRATCH.get("pixels", height * width * channels)
        _unfilter(spng, png, out, fmt)
    except _NotPlain:
        return None
    except Exception:  # noqa: BLE001 - any surprise in the fast path: Pillow decides (and words the error)
        return None
    pixels = out.reshape((height, width) if channels == 1 else (height, width, channels))
    return pixels if scratch else pixels.copy()
