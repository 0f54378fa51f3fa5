"""Decode as a stage of its own: a batch of keys in, its pixels at model resolution out, in a few arrays.

A decode actor (workers/decode_actors.py) runs `decode_batch` on any node with free CPUs and returns a
`DecodedBatch`; Ray stores its arrays in the object store, and the feature worker reads them there
without a copy (`unpack`) and scores them like images it decoded itself (`pipeline.score_decoded`).
The pixels are exactly those of `decode_many` (the worker's own decode path, `workers.decode`), so the
scores are the same.

All geometries travel: images of one shape share one uint8 array (B, h, w, 3). With `squash` every
image has the model's input size, so a batch is one array; `aspect` and `tile` give one array per
distinct shape in the batch (an image's shape depends on its own aspect ratio). An image that could not
be read or decoded travels as its error text, and becomes the same error row as in the worker.

Pure: no Ray, Redis or queue here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from patchaudit.workers.decode import DEFAULT_MAX_PIXELS, DecodedImage, Preprocess
from patchaudit.workers.geometry import group_by_shape
from patchaudit.workers.pipeline import Decoded, decode_many


@dataclass(frozen=True)
class DecodedBatch:
    """One batch's decode result: every key once, in order, as pixels or as an error."""

    keys: tuple[str, ...]
    pixels: tuple[np.ndarray, ...]  # one (n_g, h, w, 3) uint8 array per distinct shape, in order of first use
    groups: tuple[tuple[int, ...], ...]  # positions (into keys) of each array's images, in the array's order
    original_sizes: tuple[tuple[int, int] | None, ...]  # (height, width) as stored; None for an error
    errors: tuple[str | None, ...]  # the error row's reason; None when decoded
    decode_ms: tuple[float, ...]  # read + decode + resize, per image

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.pixels)


def pack(items: Sequence[Decoded]) -> DecodedBatch:
    """`Decoded` results (in key order) -> one array per shape, errors beside them."""
    good = [i for i, it in enumerate(items) if it.image is not None]
    shapes = [items[i].image.pixels.shape for i in good]  # type: ignore[union-attr]
    pixels, groups = [], []
    for group in group_by_shape(shapes):
        positions = tuple(good[g] for g in group)
        pixels.append(np.stack([items[p].image.pixels for p in positions]))  # type: ignore[union-attr]  # (n, h, w, 3)
        groups.append(positions)
    return DecodedBatch(
        keys=tuple(it.key for it in items),
        pixels=tuple(pixels),
        groups=tuple(groups),
        original_sizes=tuple(it.image.original_size if it.image is not None else None for it in items),
        errors=tuple(None if it.image is not None else (it.error or "not decoded") for it in items),
        decode_ms=tuple(it.decode_ms for it in items),
    )


def unpack(batch: DecodedBatch) -> list[Decoded]:
    """The `Decoded` results again, in key order; each image's pixels are a view into its shape's array."""
    images: dict[int, DecodedImage] = {}
    for arr, positions in zip(batch.pixels, batch.groups):
        for row, pos in enumerate(positions):
            size = batch.original_sizes[pos]
            assert size is not None  # a decoded image always has its stored size (pack writes both)
            images[pos] = DecodedImage(pixels=arr[row], original_size=size)
    return [
        Decoded(key, images.get(i), batch.errors[i] if i not in images else None, batch.decode_ms[i])
        for i, key in enumerate(batch.keys)
    ]


def decode_batch(
    read: Callable[[str], bytes],
    keys: Sequence[str],
    prep: Preprocess,
    threads: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedBatch:
    """Read and decode `keys` (workers.pipeline.decode_many: the worker's own path) into one batch."""
    return pack(list(decode_many(read, keys, prep, threads, max_pixels=max_pixels)))
