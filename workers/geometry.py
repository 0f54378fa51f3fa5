"""Input geometry: how an image of any shape becomes backbone input (`model.geometry`).

- `squash` (the default, and what every model fitted before this option did): resize to
  `image_size` whatever the shape; a 900x450 image is stretched 2:1.
- `aspect`: keep the aspect ratio. The short side (`aspect_side: short`, or the long side) becomes
  S = image_size[0]; the other side is scaled by the same factor and rounded to a multiple of the
  backbone's deepest stride (at most half a stride of distortion), so every feature level tiles the
  input exactly. Images of different shapes get inputs of different sizes; a batch is run as one
  backbone pass per shape (`group_by_shape`).
- `tile`: the image is scaled by `tile_scale` (1 = original pixels; an image smaller than one tile is
  enlarged until its short side fills a tile), both sides rounded to the stride, and cut into
  overlapping square tiles (workers/tiling.py). Every tile is scored against the same model and the
  patch maps are stitched back with overlaps averaged.

Pure functions on shapes; no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

GEOMETRY_FIELDS = ("geometry", "image_size", "center_crop", "aspect_side", "tile_size", "tile_overlap", "tile_scale")


def round_to_stride(length: float, stride: int) -> int:
    """`length` rounded to the nearest multiple of `stride`, at least one stride."""
    return max(stride, int(round(length / stride)) * stride)


def aspect_size(height: int, width: int, side: int, which: str, stride: int) -> tuple[int, int]:
    """(h, w) input size that keeps the aspect ratio: the short (or long) side becomes `side`.

    Both sides are rounded to multiples of `stride` (the chosen side too, if `side` is not one).
    """
    if which not in ("short", "long"):
        raise ValueError(f"which must be 'short' or 'long', not {which!r}")
    ref = min(height, width) if which == "short" else max(height, width)
    f = side / ref
    return round_to_stride(height * f, stride), round_to_stride(width * f, stride)


def tile_canvas_size(height: int, width: int, scale: float, tile: int, stride: int) -> tuple[int, int]:
    """(h, w) of the image as tiled: scaled by `scale`, enlarged if its short side is below one tile,
    both sides rounded to `stride` and at least `tile`."""
    h, w = height * scale, width * scale
    if min(h, w) < tile:  # too small for one tile: enlarge (aspect kept) rather than pad
        f = tile / min(h, w)
        h, w = h * f, w * f
    return max(tile, round_to_stride(h, stride)), max(tile, round_to_stride(w, stride))


def target_size(
    height: int,
    width: int,
    geometry: str,
    image_size: tuple[int, int],
    stride: int,
    aspect_side: str = "short",
    tile_size: int = 256,
    tile_scale: float = 1.0,
) -> tuple[int, int]:
    """The (h, w) an image of `height` x `width` is resized to before the backbone (or before tiling)."""
    if geometry == "squash":
        return tuple(image_size)  # type: ignore[return-value]
    if geometry == "aspect":
        return aspect_size(height, width, image_size[0], aspect_side, stride)
    if geometry == "tile":
        return tile_canvas_size(height, width, tile_scale, tile_size, stride)
    raise ValueError(f"unknown geometry {geometry!r}")


def group_by_shape(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Positions grouped by equal shape, groups in order of first appearance (one backbone pass each)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    return list(groups.values())


def describe(config: Any) -> dict[str, Any]:
    """The geometry part of a model config, as the manifest records it."""
    out: dict[str, Any] = {"mode": config.geometry}
    if config.geometry == "squash":
        out.update(
            image_size=list(config.image_size), center_crop=list(config.center_crop) if config.center_crop else None
        )
    elif config.geometry == "aspect":
        out.update(side=config.image_size[0], aspect_side=config.aspect_side)
    else:
        out.update(
            tile_size=config.tile_size,
            tile_overlap=config.tile_overlap,
            tile_scale=config.tile_scale,
            stitch="mean of overlapping tiles on the patch grid",
        )
    return out


def tiles_per_image(height: int, width: int, tile: int, overlap: float) -> int:
    """How many tiles an image of `height` x `width` (already at the tiling scale) is cut into."""
    from patchaudit.workers.tiling import tile_count

    return tile_count(height, tile, overlap) * tile_count(width, tile, overlap)


def check_stride(tile_size: int, stride: int) -> None:
    """Tiles must cover whole cells of every feature level."""
    if tile_size % stride:
        raise ValueError(f"tile_size {tile_size} is not a multiple of the backbone stride {stride}")


def check_same_geometry(config: Any, manifest: dict[str, Any], source: str) -> None:
    """Refuse a config whose geometry differs from the one the model was fitted with.

    Scoring always uses the model's own geometry (from its manifest); a config file that asks for
    another one is an error rather than silently ignored. Manifests without a geometry are squash.
    """
    from patchaudit.errors import ConfigError

    fitted = manifest.get("config", {})
    asked = {k: getattr(config, k) for k in GEOMETRY_FIELDS}
    have = {k: fitted.get(k, "squash" if k == "geometry" else None) for k in GEOMETRY_FIELDS}
    mode = have["geometry"]
    relevant = {
        "squash": ("geometry", "image_size", "center_crop"),
        "aspect": ("geometry", "image_size", "aspect_side"),
        "tile": ("geometry", "tile_size", "tile_overlap", "tile_scale"),
    }.get(mode, ("geometry",))
    diff = [k for k in relevant if have[k] is not None and _norm(asked[k]) != _norm(have[k])]
    if asked["geometry"] != mode and "geometry" not in diff:
        diff.insert(0, "geometry")
    if diff:
        said = ", ".join(f"{k} {_norm(asked[k])!r} (model: {_norm(have[k])!r})" for k in diff)
        raise ConfigError(
            f"{source} asks for model.{said}; a model scores with the geometry it was fitted with. Drop the "
            f"model section from the config (only run settings are used here) or refit with this geometry"
        )


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v
