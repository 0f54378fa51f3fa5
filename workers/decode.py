"""Safe image decoding: bytes in, an 8-bit RGB array out, or a `DecodeError` that says why.

Everything a factory archive can throw at us ends here: corrupt or truncated files, zero bytes, text
files with an image extension, 16-bit and CMYK images, EXIF-rotated photos and absurdly large frames.
Decoding never raises anything but `DecodeError`, so a worker can turn it into an error row.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from patchaudit.errors import PatchauditError

# 100 megapixels: far above any inspection camera we know of, far below what exhausts a worker.
DEFAULT_MAX_PIXELS = 100_000_000


class DecodeError(PatchauditError):
    """An input object is not a decodable image (the message is the report's error reason)."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes backbone input: resize (no crop unless asked), then optional center crop."""

    image_size: tuple[int, int] = (256, 256)  # (height, width) fed to the backbone
    center_crop: tuple[int, int] | None = None  # (height, width) cut from the resized image; None = off

    @property
    def input_size(self) -> tuple[int, int]:
        return self.center_crop or self.image_size


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (h, w, 3) uint8, already resized (and cropped) for the backbone
    original_size: tuple[int, int]  # (height, width) of the stored image, after EXIF orientation


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16/32-bit integer images are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit sensors: keep absolute intensities (65535 -> 255) rather than per-image min-max,
        # which would make every frame look equally bright.
        scale = 257.0 if arr.max(initial=0) <= 65535 else arr.max() / 255.0
        arr8 = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        hi = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        arr8 = np.clip(np.rint(arr / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...


def decode_image(data: bytes, prep: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode `data`, respect EXIF orientation, convert to RGB8, resize (and crop) for the backbone."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the size limit; Pillow's warning fires at its own
            # ~89.5 MP default (below ours), so it must not reject images that max_pixels allows.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: nothing decoded yet
            if w <= 0 or h <= 0:
                raise DecodeError(f"invalid image size {w}x{h}")
            if w * h > max_pixels:
                raise DecodeError(f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb8(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, MemoryError, EOFError) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from None
    except Exception as exc:  # decoders trip over hostile headers in other ways (TypeError, OverflowError, ...)
        raise DecodeError(f"corrupt image ({type(exc).__name__}: {exc})") from None
    original = (img.height, img.width)
    th, tw = prep.image_size
    if (img.height, img.width) != (th, tw):
        img = img.resize((tw, th), Image.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    if prep.center_crop is not None:
        ch, cw = prep.center_crop
        top, left = (th - ch) // 2, (tw - cw) // 2
        pixels = pixels[top : top + ch, left : left + cw]
    return DecodedImage(pixels=np.ascontiguousarray(pixels), original_size=original)
