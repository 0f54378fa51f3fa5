"""End to end from PNG and from JPEG files on one GPU, with each decoder: images/s per decode path and model.

    python benchmarks/gpu_e2e.py --images DIR [--repeat 10] [--models NAME[:DIM] ...]
                                               [--batch-size 32] [--decode-workers N] [--out results.json]

The compute is `benchmarks/gpu_worker.py`'s worker path (backbone fp32, PatchCore embedding, exact fp32
k-NN on a synthetic 20,000-patch bank, maps and their statistics on the device) and, for each model, its
fp16 variant (half-precision backbone, k-NN with 8 candidates re-ranked in fp32). The images are the PNGs
under `--images` and JPEG copies of them (quality 95, written to a temporary folder, not timed). Decode
paths, each feeding the same compute:

- `png-pillow`: a DataLoader pool of `--decode-workers` processes decoding with Pillow (the old path);
- `png-fast`: the same pool with `workers.png_fast` (identical pixels; needs pyspng and deflate installed,
  else reported as unavailable);
- `jpeg-pillow`, `jpeg-draft`: the pool decoding JPEGs with Pillow, at full or reduced DCT scale;
- `jpeg-nvjpeg`: `workers.gpu_decode.decode_batch` on the GPU (nvJPEG), the file reads in a thread pool.

Only torch, timm, numpy and pillow are needed (faiss, ray, redis and boto3 are made unimportable, as in
gpu_worker.py). On CPU (`--device cpu`) it runs as a smoke test; its numbers mean nothing there.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gpu_worker as gw  # noqa: E402  (benchmarks/ is on sys.path when run as a script; blocks faiss & co.)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from patchaudit.workers import png_fast  # noqa: E402
from patchaudit.workers.decode import DecodedImage, Preprocess  # noqa: E402
from patchaudit.workers.gpu_decode import decode_batch  # noqa: E402


def jpeg_copies(paths: list[Path], folder: Path) -> list[Path]:
    from PIL import Image

    out = {}
    for i, path in enumerate(dict.fromkeys(paths)):
        jpg = folder / f"{i:05d}.jpg"
        Image.open(path).convert("RGB").save(jpg, format="JPEG", quality=95)
        out[path] = jpg
    return [out[p] for p in paths]


def run_nvjpeg(
    worker: Any, v: Any, bank: torch.Tensor, paths: list[Path], prep: Preprocess, args: argparse.Namespace
) -> dict[str, Any]:
    """Reads in a thread pool, one batch ahead; each batch decoded on the GPU, then the worker's compute."""
    worker.set_variant(v, bank)
    chunks = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    n = fallbacks = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool, torch.inference_mode():
        pending = pool.map(lambda p: p.read_bytes(), chunks[0])
        for k in range(len(chunks)):
            datas = list(pending)
            if k + 1 < len(chunks):
                pending = pool.map(lambda p: p.read_bytes(), chunks[k + 1])
            out = decode_batch(datas, prep, worker.device)
            good = [r for r in out if isinstance(r, DecodedImage)]
            fallbacks += len(out) - len(good)
            pixels = torch.from_numpy(np.stack([r.pixels for r in good]))
            sizes = torch.tensor([r.original_size for r in good])
            worker.step(pixels, sizes)
            n += len(good)
    gw.sync(worker.device)
    return {"variant": v.name, "images": n, "images_per_s": n / (time.perf_counter() - t0), "errors": fallbacks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True, help="a folder of PNGs (e.g. a copy of bottle/test)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "wide_resnet50_2:1024"])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    p.add_argument("--image-size", type=int, nargs=2, default=[256, 256])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decode-workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--bank-size", type=int, default=20000)
    p.add_argument("--refine", type=int, default=8)
    p.add_argument("--paths", nargs="+", default=["png-pillow", "png-fast", "jpeg-pillow", "jpeg-draft", "jpeg-nvjpeg"])
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = (args.image_size[0], args.image_size[1])
    pngs = gw.list_images(args.images, args.repeat, args.max_images)
    result: dict[str, Any] = {
        "benchmark": "gpu_e2e",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": os.cpu_count(),
        "decode_workers": args.decode_workers,
        "png_fast_available": png_fast.available(),
        "images": len(pngs),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="pa_e2e_") as tmp:
        jpegs = jpeg_copies(pngs, Path(tmp))
        datasets = {
            "png-pillow": gw.ImageFiles(pngs, Preprocess(size, fast_png=False)),
            "png-fast": gw.ImageFiles(pngs, Preprocess(size)) if png_fast.available() else None,
            "jpeg-pillow": gw.ImageFiles(jpegs, Preprocess(size)),
            "jpeg-draft": gw.ImageFiles(jpegs, Preprocess(size, jpeg_draft=True)),
        }
        # decode rate alone, per path (the pool without the GPU)
        result["decode_only_img_s"] = {}
        for name, ds in datasets.items():
            if ds is not None and name in args.paths:
                rate, _ = gw.decode_pass(ds, args, pin=device.type == "cuda")
                result["decode_only_img_s"][name] = rate["images_per_s"]
                print(
                    f"decode {name}: {rate['images_per_s']:.1f} img/s ({args.decode_workers} processes)",
                    file=sys.stderr,
                )
        _, batches = gw.decode_pass(gw.ImageFiles(pngs[: 4 * args.batch_size], Preprocess(size)), args, pin=False)
        for spec in args.models:
            name, _, dim = spec.partition(":")
            worker = gw.Worker(name, tuple(args.layers), int(dim) if dim else None, device, size, False)
            bank = gw.build_bank(worker, batches, args.bank_size)
            variants = [gw.Variant("fp32", False, "fp32", 0, "gpu")]
            if device.type == "cuda":
                variants.append(gw.Variant("fp16", True, "fp16", args.refine, "gpu"))
            with torch.inference_mode():
                worker.set_variant(variants[0], bank)
                worker.threshold = float(np.median(worker.step(*batches[0])))
            rows: dict[str, Any] = {}
            for v in variants:
                for path in args.paths:
                    if path == "jpeg-nvjpeg":
                        r = run_nvjpeg(worker, v, bank, jpegs, Preprocess(size), args)
                    elif datasets.get(path) is None:
                        r = {"variant": v.name, "unavailable": "pyspng/deflate not installed"}
                    else:
                        r = gw.run_e2e(worker, v, bank, datasets[path], args)
                    rows[f"{path} {v.name}"] = r
                    if "images_per_s" in r:
                        print(f"  {name} {v.name} {path}: {r['images_per_s']:.1f} img/s end to end", file=sys.stderr)
            result["models"][spec] = rows
    text = json.dumps(result, indent=2)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_e2e.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
