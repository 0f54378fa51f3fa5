"""JPEG decode on the GPU in batches (nvJPEG through torchvision), with a per-image CPU fallback.

A GPU decodes a batch of JPEGs with nvJPEG many times faster than a host's cores can (about 5,700
images/s of 900x900 on one H100 against ~300 for 16 cores, benchmarks/README.md), so a worker with a GPU
and JPEG inputs need not wait for its CPUs. `decode_batch` keeps `workers.decode`'s contract per image:
8-bit RGB at the model's input size, or the error message a `DecodeError` would carry.

What goes to the GPU: JPEGs whose header Pillow reads (size within `max_pixels`) and that carry no EXIF
rotation. Everything else (other formats, rotated photos, CMYK, a header Pillow rejects) and every image
whose GPU decode fails is decoded on the CPU by `decode_image`, which also writes the error of a broken
file. If the batched call itself fails, each image is tried on its own before falling back.

Pixels: nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a few levels, and the resize is
torch's antialiased bilinear (close to, not equal to, Pillow's); `benchmarks/decoders.py` and the GPU
command in the notes measure the difference.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image

from patchaudit.workers.decode import DEFAULT_MAX_PIXELS, DecodedImage, DecodeError, Preprocess, decode_image

JPEG_MAGIC = b"\xff\xd8\xff"

Result = DecodedImage | str  # a decoded image, or the reason it is not one


def _gpu_candidate(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(height, width) when this JPEG can go to the GPU as is, else None (the CPU path decides)."""
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # header only
            w, h = img.size
            if img.format != "JPEG" or img.mode not in ("RGB", "L") or not 0 < w * h <= max_pixels:
                return None
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                return None
    except Exception:  # noqa: BLE001 - a header Pillow cannot read: the CPU path words the error
        return None
    return h, w


def _resize(img: torch.Tensor, prep: Preprocess) -> np.ndarray:
    """(3, H, W) uint8 on any device -> (h, w, 3) uint8 host array at the size the geometry gives it."""
    th, tw = prep.target_size(int(img.shape[1]), int(img.shape[2]))
    if tuple(img.shape[1:]) != (th, tw):
        x = F.interpolate(img[None].float(), size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
        img = x[0].round_().clamp_(0, 255).to(torch.uint8)
    if prep.center_crop is not None:  # squash only (the config allows no crop with other geometries)
        th, tw = prep.image_size
        ch, cw = prep.center_crop
        top, left = (th - ch) // 2, (tw - cw) // 2
        img = img[:, top : top + ch, left : left + cw]
    return np.ascontiguousarray(img.permute(1, 2, 0).cpu().numpy())


def _cpu(data: bytes, prep: Preprocess, max_pixels: int) -> Result:
    try:
        return decode_image(data, prep, max_pixels)
    except DecodeError as exc:
        return str(exc)


def _nvjpeg(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode on `device`: the whole batch in one call, else one by one; None where an image fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001 - one bad image fails the batched call: find it
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001 - this one goes to the CPU
                out.append(None)
        return out


def decode_batch(
    datas: Sequence[bytes],
    prep: Preprocess,
    device: torch.device | str = "cuda",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    gpu_decode: Callable[[list[torch.Tensor], torch.device], list[torch.Tensor | None]] = _nvjpeg,
) -> list[Result]:
    """Decode a batch: JPEGs on `device` in one nvJPEG call, the rest (and any failure) on the CPU."""
    device = torch.device(device)
    results: list[Result | None] = [None] * len(datas)
    todo: list[int] = []
    for i, data in enumerate(datas):
        if data and _gpu_candidate(data, max_pixels) is not None:
            todo.append(i)
        else:
            results[i] = _cpu(data, prep, max_pixels)
    if todo:
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in todo]
        try:
            decoded = gpu_decode(tensors, device)
        except Exception:  # noqa: BLE001 - no usable GPU decoder at all: the CPU does the batch
            decoded = [None] * len(todo)
        for i, img in zip(todo, decoded):
            if img is None or img.ndim != 3 or img.shape[0] != 3:
                results[i] = _cpu(datas[i], prep, max_pixels)
                continue
            h, w = int(img.shape[1]), int(img.shape[2])
            results[i] = DecodedImage(pixels=_resize(img, prep), original_size=(h, w))
    return [r if r is not None else "internal error: image not decoded" for r in results]
