"""Decode + resize to the model's input, per core, for each decoder and image format (Pillow = 1.0x).

    python benchmarks/decoders.py [--data DIR] [--tiles DIR] [--images 12] [--large 3] [--reps 3]
                                  [--size 256 256] [--out results.json]

One process, one thread: every figure is CPU time per image on one core (`time.process_time`), best of
`--reps` passes over the images (wall time is reported beside it). Image sets:

- `bottle PNG 900x900`: the first `--images` bottle test PNGs, as stored;
- `magnetic tile JPEG`: the first `--images` magnetic tile test JPEGs (about 100-630 x 220-400, gray);
- `PNG 3000x2000` and `JPEG 3000x2000`: `--large` bottle images upscaled to 3000x2000 (bicubic) and
  encoded here (PNG at Pillow's default level, JPEG quality 95), for archives of large photos.

Decoders (each ends in 8-bit RGB at `--size`, Pillow's bilinear resize, as `workers.decode` does):

- `pillow`: today's path (`decode_image` with `fast_png=False`, `jpeg_draft=False`);
- `fast` (PNG): `workers.png_fast` through `decode_image` (ISA-L inflate + libspng unfilter);
- `pyspng` (PNG): libspng with its own zlib inflate, then the same resize;
- `draft` (JPEG): `decode_image` with `jpeg_draft=True` (libjpeg's DCT scaling, 1/2-1/8);
- `simplejpeg`, `simplejpeg-scaled`, `imagecodecs`: measured when installed (not dependencies).

Pixels: the largest and mean |difference| from `pillow` over the images (0 = identical).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from patchaudit.workers import png_fast  # noqa: E402
from patchaudit.workers.decode import Preprocess, decode_image  # noqa: E402

DEFAULT_DATA = os.path.join("..", "shared", "data", "mvtec_ad", "bottle")
DEFAULT_TILES = os.path.join("..", "shared", "data", "magnetic_tile", "magnetic_tile")

Decoder = Callable[[bytes], np.ndarray]


def resize_rgb(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(arr)
    img = img.convert("RGB") if img.mode != "RGB" else img
    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img)


def decoders(size: tuple[int, int]) -> dict[str, dict[str, Decoder]]:
    """{format: {name: bytes -> (h, w, 3) uint8}} for what is installed here."""
    pillow = Preprocess(size, fast_png=False)
    fast = Preprocess(size)
    draft = Preprocess(size, jpeg_draft=True)
    png: dict[str, Decoder] = {"pillow": lambda d: decode_image(d, pillow).pixels}
    jpg: dict[str, Decoder] = {
        "pillow": lambda d: decode_image(d, pillow).pixels,
        "draft": lambda d: decode_image(d, draft).pixels,
    }
    if png_fast.available():
        import pyspng

        png["fast"] = lambda d: decode_image(d, fast).pixels
        png["pyspng"] = lambda d: resize_rgb(pyspng.load(d), size)
    try:
        import simplejpeg
    except ImportError:
        pass
    else:
        jpg["simplejpeg"] = lambda d: resize_rgb(simplejpeg.decode_jpeg(d, "rgb"), size)
        jpg["simplejpeg-scaled"] = lambda d: resize_rgb(
            simplejpeg.decode_jpeg(d, "rgb", min_height=size[0], min_width=size[1]), size
        )
    try:
        import imagecodecs
    except ImportError:
        pass
    else:
        png["imagecodecs"] = lambda d: resize_rgb(imagecodecs.png_decode(d), size)
        jpg["imagecodecs"] = lambda d: resize_rgb(imagecodecs.jpeg8_decode(d), size)
    return {"PNG": png, "JPEG": jpg}


def large_copies(paths: list[Path], n: int, fmt: str) -> list[bytes]:
    out = []
    for path in paths[:n]:
        img = Image.open(path).convert("RGB").resize((3000, 2000), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def measure(fn: Decoder, datas: list[bytes], reps: int) -> dict[str, float]:
    fn(datas[0])  # warm-up (imports, first allocations)
    best_cpu = best_wall = float("inf")
    for _ in range(reps):
        c, w = time.process_time(), time.perf_counter()
        for d in datas:
            fn(d)
        best_cpu = min(best_cpu, (time.process_time() - c) * 1e3 / len(datas))
        best_wall = min(best_wall, (time.perf_counter() - w) * 1e3 / len(datas))
    return {"cpu_ms": best_cpu, "wall_ms": best_wall}


def pixel_diff(fn: Decoder, ref: Decoder, datas: list[bytes]) -> dict[str, float]:
    diffs = [np.abs(fn(d).astype(np.int16) - ref(d).astype(np.int16)) for d in datas]
    return {
        "max_abs_diff": int(max(d.max() for d in diffs)),
        "mean_abs_diff": float(np.mean([d.mean() for d in diffs])),
    }


def run(sets: dict[str, tuple[str, list[bytes]]], size: tuple[int, int], reps: int) -> dict[str, Any]:
    table = decoders(size)
    results: dict[str, Any] = {}
    for set_name, (fmt, datas) in sets.items():
        ref = table[fmt]["pillow"]
        rows: dict[str, Any] = {}
        for name, fn in table[fmt].items():
            rows[name] = {**measure(fn, datas, reps), **pixel_diff(fn, ref, datas)}
        base = rows["pillow"]["cpu_ms"]
        for row in rows.values():
            row["speedup"] = base / row["cpu_ms"]
        results[set_name] = {
            "format": fmt,
            "images": len(datas),
            "bytes_mean": int(np.mean([len(d) for d in datas])),
            "decoders": rows,
        }
    return results


def print_table(results: dict[str, Any]) -> None:
    print(
        f"{'images':<22} {'decoder':<18} {'cpu ms/img':>10} {'wall ms':>8} {'speedup':>8} {'max|d|':>7} {'mean|d|':>8}",
        file=sys.stderr,
    )
    for set_name, r in results.items():
        for name, row in r["decoders"].items():
            print(
                f"{set_name:<22} {name:<18} {row['cpu_ms']:>10.2f} {row['wall_ms']:>8.2f} {row['speedup']:>7.2f}x "
                f"{row['max_abs_diff']:>7d} {row['mean_abs_diff']:>8.3f}",
                file=sys.stderr,
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"MVTec-style bottle dir (default {DEFAULT_DATA})")
    p.add_argument("--tiles", default=DEFAULT_TILES, help=f"magnetic tile dir (default {DEFAULT_TILES})")
    p.add_argument("--images", type=int, default=12, help="stored images per set")
    p.add_argument("--large", type=int, default=3, help="3000x2000 copies per format (0: none)")
    p.add_argument("--reps", type=int, default=3, help="passes over each set; the best counts")
    p.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="model input size")
    p.add_argument("--out", help="write the JSON here (else stdout)")
    args = p.parse_args(argv)

    pngs = sorted(Path(args.data).glob("test/*/*.png"))
    tiles = sorted(Path(args.tiles).glob("test/*/*.jpg"))
    if not pngs:
        raise SystemExit(f"no PNGs under {args.data}/test")
    sets: dict[str, tuple[str, list[bytes]]] = {
        "bottle PNG 900x900": ("PNG", [p.read_bytes() for p in pngs[: args.images]])
    }
    if tiles:
        sets["magnetic tile JPEG"] = ("JPEG", [p.read_bytes() for p in tiles[: args.images]])
    if args.large:
        sets["PNG 3000x2000"] = ("PNG", large_copies(pngs, args.large, "PNG"))
        sets["JPEG 3000x2000"] = ("JPEG", large_copies(pngs, args.large, "JPEG"))
    size = (args.size[0], args.size[1])
    results = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "size": list(size),
        "sets": run(sets, size, args.reps),
    }
    print_table(results["sets"])
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
