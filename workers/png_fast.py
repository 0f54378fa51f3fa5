"""Fast PNG decode with exactly Pillow's pixels: ISA-L inflate, then libspng unfilters.

A PNG decode is mostly inflate (zlib) and then unfiltering the scanlines. Pillow does both with zlib and its
own unfilter, libspng (`pyspng`) with zlib and a faster unfilter, and ISA-L's inflate (`isal`) is about
twice as fast as zlib's. So we inflate the image data with ISA-L, store the scanlines back into a PNG
without compression (stored deflate blocks: a copy, no work) and let libspng unfilter that. The result
is handed to Pillow's own resize untouched, so the backbone input is identical, bit for bit, to the
Pillow path (`tests/unit/test_png_fast.py` checks every colour type).

Only the plain, common case takes this path: 8-bit depth, no interlace, every chunk's CRC right, the zlib
stream exactly as long as the header says, and no chunk that could carry an EXIF or XMP orientation
(those images need `ImageOps.exif_transpose`). Anything else, including every broken file, returns
None and the caller decodes with Pillow, which also writes the error message: hostile input gets
exactly the answers it got before.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

try:  # both are pinned dependencies; without them Pillow decodes everything (slower, same pixels)
    import isal.isal_zlib as _isal
    import pyspng as _spng
except ImportError:  # pragma: no cover - exercised only where the wheels are missing
    _isal = None  # type: ignore[assignment]
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


def available() -> bool:
    return _spng is not None and _isal is not None


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
        if _isal.crc32(payload, _isal.crc32(tag)) != crc:
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


def _stored_png(ihdr: bytes, copied: list[bytes], raw: bytes) -> bytes:
    """A PNG whose one IDAT holds `raw` (the filtered scanlines) in stored deflate blocks: one copy of `raw`.

    The IDAT's CRC is left 0: libspng runs with chunk CRCs unchecked in pyspng (SPNG_CRC_USE), and the
    original file's CRCs were all checked in `_parse`. Should a pyspng release check them, the decode
    fails and Pillow decodes the file: slower, never wrong.
    """
    n = len(raw)
    nblocks = max(1, -(-n // _STORED_BLOCK))
    zlen = 2 + 5 * nblocks + n + 4  # zlib header, block headers, data, adler32
    src = memoryview(raw)
    pieces: list[Any] = [PNG_SIGNATURE, ihdr, *copied, struct.pack(">I4s", zlen, b"IDAT"), b"\x78\x01"]
    for i in range(nblocks):
        block = src[i * _STORED_BLOCK : (i + 1) * _STORED_BLOCK]
        pieces.append(struct.pack("<BHH", 1 if i == nblocks - 1 else 0, len(block), len(block) ^ 0xFFFF))
        pieces.append(block)
    pieces.append(struct.pack(">II", _isal.adler32(raw), 0))  # adler32 (libspng's zlib checks it), CRC
    pieces.append(_IEND)
    return b"".join(pieces)


def decode_png(data: bytes, max_pixels: int) -> np.ndarray | None:
    """Decode a plain 8-bit PNG to (H, W) uint8 (gray) or (H, W, 4) uint8 RGBX; None: use Pillow.

    RGB images come back with a fourth channel (alpha, or 255) that the caller ignores: Pillow stores RGB 4
    bytes a pixel, so it wraps this array as RGBX without a copy and resizes each channel on its own.
    Palettes are expanded and alpha is dropped, as `convert("RGB")` does.
    """
    if not available():
        return None
    try:
        ihdr, copied, idat, width, height, ctype = _parse(data)
        if width * height > max_pixels:
            return None  # Pillow writes the "too large" message
        stride = 1 + width * _CHANNELS[ctype]  # filter byte + one row of samples
        expected = height * stride
        inflater = _isal.decompressobj()
        stream = idat[0] if len(idat) == 1 else b"".join(idat)
        # One byte more than the header allows tells an over-long stream (a bomb, a broken file) from an
        # exact one, and bounds the memory whatever the stream says.
        raw = inflater.decompress(stream, expected + 1)
        if len(raw) != expected or not inflater.eof:
            raise _NotPlain  # too long, truncated, or trailing garbage
        png = _stored_png(ihdr, copied, raw)
        fmt = "L" if ctype == 0 else "RGBA"  # libspng has no 8-bit gray output for gray + alpha
        pixels = _spng.load(png, fmt)
    except _NotPlain:
        return None
    except Exception:  # noqa: BLE001 - any surprise in the fast path: Pillow decides (and words the error)
        return None
    return pixels
