"""Tiling large images: overlapping square tiles cut on the backbone's stride, patch maps stitched back.

Tile starts are multiples of the deepest backbone stride and the tile side is one too, so the patch
grid of every tile lines up exactly with one patch grid of the whole image: a tile's cell (i, j) is the
image's cell (y0/cell + i, x0/cell + j). Stitching therefore happens on that grid, before any
upsampling or blur: overlapping cells are averaged (every cell is covered at least once); the image
score and the full-resolution map are computed from the stitched grid exactly as for one untiled image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

Box = tuple[int, int]  # (top, left) of a tile on the scaled image


def tile_count(length: int, tile: int, overlap: float) -> int:
    """Tiles along one side of `length` px: consecutive starts at most tile*(1-overlap) apart."""
    if length <= tile:
        return 1
    step = max(1.0, tile * (1.0 - overlap))
    return math.ceil((length - tile) / step) + 1


def tile_starts(length: int, tile: int, overlap: float, stride: int) -> list[int]:
    """Starts of the tiles along one side: 0 first, length - tile last, all multiples of `stride`.

    `length` and `tile` must be multiples of `stride`. Starts are spread evenly and rounded up to the
    stride, so two consecutive starts are never more than one tile apart: the tiles cover every pixel.
    """
    if length % stride or tile % stride:
        raise ValueError(f"length {length} and tile {tile} must be multiples of the stride {stride}")
    if length <= tile:
        return [0]
    n = tile_count(length, tile, overlap)
    span = (length - tile) // stride  # in strides
    return sorted({math.ceil(i * span / (n - 1)) * stride for i in range(n)})


def tile_boxes(height: int, width: int, tile: int, overlap: float, stride: int) -> list[Box]:
    """(top, left) of every tile of a `height` x `width` image, row-major."""
    ys, xs = tile_starts(height, tile, overlap, stride), tile_starts(width, tile, overlap, stride)
    return [(y, x) for y in ys for x in xs]


def cut_tiles(pixels: np.ndarray, boxes: Sequence[Box], tile: int) -> np.ndarray:
    """(H, W, 3) image -> (n, tile, tile, 3) tiles (copies, contiguous)."""
    return np.stack([pixels[y : y + tile, x : x + tile] for y, x in boxes])


def stitch(grids: torch.Tensor, boxes: Sequence[Box], cell: int, size: tuple[int, int]) -> torch.Tensor:
    """Tile patch grids (n, g, g) -> the image's patch grid (H/cell, W/cell), overlapping cells averaged.

    `cell` is the input pixels per grid cell (tile / g); `size` the (H, W) of the tiled image.
    """
    n, gh, gw = grids.shape
    if n != len(boxes):
        raise ValueError(f"{n} tile grids for {len(boxes)} tiles")
    hg, wg = size[0] // cell, size[1] // cell
    acc = torch.zeros(hg, wg, dtype=torch.float32, device=grids.device)
    cnt = torch.zeros(hg, wg, dtype=torch.float32, device=grids.device)
    for g, (y, x) in zip(grids.float(), boxes):
        if y % cell or x % cell:
            raise ValueError(f"tile at ({y}, {x}) is not on the {cell}-px patch grid")
        cy, cx = y // cell, x // cell
        acc[cy : cy + gh, cx : cx + gw] += g
        cnt[cy : cy + gh, cx : cx + gw] += 1
    if bool((cnt == 0).any()):
        raise ValueError("the tiles do not cover the image")
    return acc / cnt
