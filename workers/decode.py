"""Safe image decoding: bytes in, an 8-bit RGB array out, or a `DecodeError` that says why.

Everything a factory archive can throw at us ends here: corrupt or truncated files, zero bytes, text
files with an image extension, 16-bit and CMYK images, EXIF-rotated photos and absurdly large frames.
Decoding never raises anything but `DecodeError`, so a worker can turn it into an error row.

Plain 8-bit PNGs take a faster decoder with identical pixels (`png_fast`); everything else, and every
file that decoder does not accept, goes through Pillow. Large JPEGs can be decoded at a reduced scale in
the DCT domain (`Preprocess.jpeg_draft`): much faster, slightly different pixels.

The resize to the backbone's input is antialiased bilinear either way (`Preprocess.resize`): `pillow`
is Pillow's resize, bit for bit what models fitted before this option saw; `torch` runs torch's uint8
kernel (AVX2 on x86), several times faster on a 900x900 image and within one level of Pillow's (its
fixed-point weights round differently: on bottle's images 0.1% of the values differ, by 1).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from patchaudit.errors import PatchauditError
from patchaudit.workers import png_fast
from patchaudit.workers.geometry import target_size

# 100 megapixels: far above any inspection camera we know of, far below what exhausts a worker.
DEFAULT_MAX_PIXELS = 100_000_000


class DecodeError(PatchauditError):
    """An input object is not a decodable image (the message is the report's error reason)."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes backbone input: resize as the geometry says (workers/geometry.py), then
    an optional center crop (squash only). With `tile`, the resized image is cut into tiles later."""

    image_size: tuple[int, int] = (256, 256)  # (height, width) fed to the backbone (squash)
    center_crop: tuple[int, int] | None = None  # (height, width) cut from the resized image; None = off
    # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image stays at least image_size (Pillow's
    # draft), then resize as usual. Several times faster on large photos; pixels differ slightly.
    jpeg_draft: bool = False
    fast_png: bool = True  # plain 8-bit PNGs through png_fast (identical pixels); False: always Pillow
    resize: str = "pillow"  # pillow | torch: who resizes (both antialiased bilinear, within one level)
    geometry: str = "squash"  # squash | aspect | tile
    stride: int = 32  # the backbone's deepest stride: aspect and tile sizes are multiples of it
    aspect_side: str = "short"
    tile_size: int = 256
    tile_scale: float = 1.0

    @property
    def input_size(self) -> tuple[int, int]:
        """The fixed backbone input size of `squash` (other geometries: each image's own pixels shape)."""
        return self.center_crop or self.image_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) an image of `height` x `width` is resized to."""
        return target_size(
            height,
            width,
            self.geometry,
            self.image_size,
            self.stride,
            self.aspect_side,
            self.tile_size,
            self.tile_scale,
        )


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
    if prep.fast_png and data[:8] == png_fast.PNG_SIGNATURE:
        # None: not the plain case, Pillow decodes it below. The array is png_fast's buffer, reused by this
        # thread's next decode: _from_array resizes it into a new array (or copies it).
        arr = png_fast.decode_png(data, max_pixels, rgbx=prep.resize == "pillow", scratch=True)
        if arr is not None:
            return _from_array(arr, prep)
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the size limit; Pillow's warning fires at its own
            # ~89.5 MP default (below ours), so it must not reject images that max_pixels allows.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: nothing decoded yet
            if w <= 0 or h <= 0:
                raise DecodeError(f"invalid image size {w}x{h}")
            if w * h > max_pixels:
                raise DecodeError(f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
            stored = None  # the full size in display orientation, when libjpeg decodes at a reduced scale
            if prep.jpeg_draft and img.format == "JPEG":
                stored = _draft(img, prep)
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
    original = stored or (img.height, img.width)
    th, tw = prep.target_size(*original)
    if (img.height, img.width) == (th, tw):
        return _crop(np.asarray(img, dtype=np.uint8), original, prep)
    if prep.resize == "pillow":
        return _crop(np.asarray(img.resize((tw, th), Image.Resampling.BILINEAR), dtype=np.uint8), original, prep)
    # np.array: a writable copy (torch.from_numpy refuses read-only memory without a warning)
    return _crop(_resize_torch(np.array(img, dtype=np.uint8), th, tw), original, prep)


def _draft(img: Image.Image, prep: Preprocess) -> tuple[int, int] | None:
    """Ask libjpeg for the smallest DCT scale (1/2, 1/4, 1/8) that keeps the image >= its target size.

    Returns the full (height, width) after EXIF orientation when the scale changed, else None. The request
    is made in stored orientation, so a photo rotated by EXIF still ends at least image_size after rotation.
    """
    w, h = img.size
    swaps = img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # transposes width and height
    th, tw = prep.target_size(*((w, h) if swaps else (h, w)))  # in display orientation
    request = (th, tw) if swaps else (tw, th)  # (width, height) in stored orientation
    img.draft(img.mode, request)
    if img.size == (w, h):
        return None
    return (w, h) if swaps else (h, w)


def _from_array(arr: np.ndarray, prep: Preprocess) -> DecodedImage:
    """Resize and crop png_fast's (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBX array exactly as the Pillow
    path would. `arr` is a reused buffer: what is returned never shares its memory."""
    h, w = arr.shape[:2]
    th, tw = prep.target_size(h, w)
    gray = arr.ndim == 2
    if (h, w) == (th, tw):
        arr = arr.copy()
    elif prep.resize == "torch":
        arr = _resize_torch(arr, th, tw)  # reads png_fast's buffer in place
    else:
        # Pillow resizes each channel on its own with the same coefficients, so L resized and then
        # repeated equals RGB resized, and RGBX (wrapped without a copy) equals RGB in its first three.
        mode = "L" if gray else "RGBX"
        img = Image.frombuffer(mode, (w, h), arr, "raw", mode, 0, 1).resize((tw, th), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    pixels = np.repeat(arr[:, :, None], 3, axis=2) if gray else arr[:, :, :3]
    return _crop(pixels, (h, w), prep)


def _resize_torch(arr: np.ndarray, th: int, tw: int) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (th, tw) or (th, tw, C) uint8: antialiased bilinear, as Pillow's BILINEAR.

    The (H, W, C) array is read in place as a channels-last (1, C, H, W) tensor, the layout torch's
    vectorized uint8 kernel takes; it runs on the calling thread (no intra-op threads at this size).
    """
    import torch  # here, not at import: the scheduler and the CLI import this module without torch
    from torch.nn.functional import interpolate

    x = torch.from_numpy(arr)
    x = x[None, None] if arr.ndim == 2 else x.permute(2, 0, 1)[None]  # (1, C, H, W), channels-last strides
    y = interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    return (y[0, 0] if arr.ndim == 2 else y[0].permute(1, 2, 0)).numpy()


def _crop(pixels: np.ndarray, original: tuple[int, int], prep: Preprocess) -> DecodedImage:
    if prep.center_crop is not None:
        th, tw = prep.image_size
        ch, cw = prep.center_crop
        top, left = (th - ch) // 2, (tw - cw) // 2
        pixels = pixels[top : top + ch, left : left + cw]
    return DecodedImage(pixels=np.ascontiguousarray(pixels), original_size=original)
