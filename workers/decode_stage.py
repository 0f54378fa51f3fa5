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

Pure: no Ray, Redis or queue here, and no torch: a decode actor's process never loads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from patchaudit.errors import PatchauditError
from patchaudit.workers.decode import DEFAULT_MAX_PIXELS, DecodedImage, DecodeError, Preprocess, decode_image
from patchaudit.workers.geometry import group_by_shape


@dataclass
class Decoded:
    key: str
    image: DecodedImage | None
    error: str | None
    decode_ms: float


def _decode_one(read: Callable[[str], bytes], key: str, prep: Preprocess, max_pixels: int) -> Decoded:
    t0 = time.perf_counter()
    try:
        data = read(key)
        img = decode_image(data, prep, max_pixels)
        return Decoded(key, img, None, (time.perf_counter() - t0) * 1e3)
    except DecodeError as exc:
        return Decoded(key, None, str(exc), (time.perf_counter() - t0) * 1e3)
    except PatchauditError as exc:  # missing object, store failure after its own retries
        return Decoded(key, None, f"read failed: {exc}", (time.perf_counter() - t0) * 1e3)


def decode_many(
    read: Callable[[str], bytes],
    keys: Iterable[str],
    prep: Preprocess,
    threads: int = 2,
    prefetch: int = 64,
    max_pixels: int = 100_000_000,
) -> Iterator[Decoded]:
    """Decode `keys` in a thread pool, yielding in input order with at most `prefetch` in flight."""
    keys = list(keys)
    if threads <= 1:
        for k in keys:
            yield _decode_one(read, k, prep, max_pixels)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending = []
        it = iter(keys)
        for k in it:
            pending.append(pool.submit(_decode_one, read, k, prep, max_pixels))
            if len(pending) >= prefetch:
                break
        while pending:
            yield pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_decode_one, read, nxt, prep, max_pixels))


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
