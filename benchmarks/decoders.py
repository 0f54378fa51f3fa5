"""Decode + resize to the model's input, per core, for each decoder and image format (Pillow = 1.0x).

    python benchmarks/decoders.py [--data DIR] [--tiles DIR] [--images 12] [--large 3] [--reps 5]
                                  [--size 256 256] [--out results.json]

One process, one thread (torch too): every figure is CPU time per image on one core (`time.process_time`,
user + system: page faults count). The decoders are interleaved: each of `--reps` rounds runs every
decoder once over the set, so a shared machine's load drifts over all of them alike; the median round
counts (the fastest round is reported beside it, and wall time). Image sets:

- `bottle PNG 900x900`: the first `--images` bottle test PNGs, as stored;
- `magnetic tile JPEG`: the first `--images` magnetic tile test JPEGs (about 100-630 x 220-400, gray);
- `PNG 3000x2000` and `JPEG 3000x2000`: `--large` bottle images upscaled to 3000x2000 (bicubic) and
  encoded here (PNG at Pillow's default level, JPEG quality 95), for archives of large photos.

Decoders (each ends in 8-bit RGB at `--size`, antialiased bilinear, as `workers.decode` does):

- `pillow`: the Pillow path (`decode_image` with `fast_png=False`, `jpeg_draft=False`, `resize: pillow`);
- `fast` (PNG): `workers.png_fast` (libdeflate inflate + libspng unfilter) and Pillow's resize: the
  default, identical pixels;
- `fast+torch` (PNG): the same decode, resized by torch's uint8 kernel (`resize: torch`);
- `torch` (JPEG): Pillow's decode, torch's resize;
- `draft` (JPEG): `decode_image` with `jpeg_draft=True` (libjpeg's DCT scaling, 1/2-1/8), Pillow's resize;
  `draft+torch`: the same with torch's resize;
- `pyspng` (PNG, libspng with its own zlib), `simplejpeg`, `simplejpeg-scaled`, `imagecodecs`, and
  `cv2-area` (OpenCV's decoder and INTER_AREA resize): measured when installed (not dependencies).

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
import torch
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

    def path(**kw: Any) -> Decoder:
        prep = Preprocess(size, **kw)
        return lambda d: decode_image(d, prep).pixels

    png: dict[str, Decoder] = {"pillow": path(fast_png=False)}
    jpg: dict[str, Decoder] = {
        "pillow": path(),
        "torch": path(resize="torch"),
        "draft": path(jpeg_draft=True),
        "draft+torch": path(jpeg_draft=True, resize="torch"),
    }
    if png_fast.available():
        import pyspng

        png["fast"] = path()
        png["fast+torch"] = path(resize="torch")
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
    try:
        import cv2
    except ImportError:
        pass
    else:
        cv2.setNumThreads(1)

        def cv2_area(d: bytes) -> np.ndarray:
            arr = cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)
            arr = cv2.resize(arr, (size[1], size[0]), interpolation=cv2.INTER_AREA)
            return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)

        png["cv2-area"] = jpg["cv2-area"] = cv2_area
    return {"PNG": png, "JPEG": jpg}


def large_copies(paths: list[Path], n: int, fmt: str) -> list[bytes]:
    out = []
    for path in paths[:n]:
        img = Image.open(path).convert("RGB").resize((3000, 2000), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def measure(fns: dict[str, Decoder], datas: list[bytes], reps: int) -> dict[str, dict[str, float]]:
    """CPU and wall ms per image for each decoder: `reps` interleaved rounds, median and fastest round."""
    for fn in fns.values():
        fn(datas[0])  # warm-up (imports, first allocations)
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c, w = time.process_time(), time.perf_counter()
            for d in datas:
                fn(d)
            cpu[name].append((time.process_time() - c) * 1e3 / len(datas))
            wall[name].append((time.perf_counter() - w) * 1e3 / len(datas))
    return {
        name: {
            "cpu_ms": float(np.median(cpu[name])),
            "cpu_ms_best": min(cpu[name]),
            "wall_ms": float(np.median(wall[name])),
        }
        for name in fns
    }


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
        times = measure(table[fmt], datas, reps)
        rows = {name: {**times[name], **pixel_diff(fn, ref, datas)} for name, fn in table[fmt].items()}
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
        f"{'images':<22} {'decoder':<18} {'cpu ms/img':>10} {'best':>7} {'wall ms':>8} {'speedup':>8} "
        f"{'max|d|':>7} {'mean|d|':>8}",
        file=sys.stderr,
    )
    for set_name, r in results.items():
        for name, row in r["decoders"].items():
            print(
                f"{set_name:<22} {name:<18} {row['cpu_ms']:>10.2f} {row['cpu_ms_best']:>7.2f} {row['wall_ms']:>8.2f} "
                f"{row['speedup']:>7.2f}x "
                f"{row['max_abs_diff']:>7d} {row['mean_abs_diff']:>8.3f}",
                file=sys.stderr,
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"MVTec-style bottle dir (default {DEFAULT_DATA})")
    p.add_argument("--tiles", default=DEFAULT_TILES, help=f"magnetic tile dir (default {DEFAULT_TILES})")
    p.add_argument("--images", type=int, default=12, help="stored images per set")
    p.add_argument("--large", type=int, default=3, help="3000x2000 copies per format (0: none)")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds over each set; the median counts")
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
    torch.set_num_threads(1)  # per core: torch's resize, like every decoder here, on this thread only
    load_before = os.getloadavg()
    results = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "size": list(size),
        "sets": run(sets, size, args.reps),
    }
    results["loadavg_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
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
