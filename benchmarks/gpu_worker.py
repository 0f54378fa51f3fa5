"""One GPU worker's compute path, measured directly: decode pool -> backbone -> torch k-NN -> maps.

    python benchmarks/gpu_worker.py --images DIR [--repeat 20] [--out $OUT/gpu.json]
    python benchmarks/gpu_worker.py --device cpu --max-images 16     # smoke test

Runs on a bare GPU host with only torch, timm, numpy and pillow: faiss, ray, redis and boto3 are made
unimportable at the top of this file (`sys.modules[name] = None`), so an import chain that reaches
them fails here exactly as it would there. Backbones have random weights unless `--pretrained`
(timing does not depend on the values; the half-precision score differences are then measured on
random-init features, which is said in the output). The memory bank is synthetic: `--bank-size`
patch embeddings of the benchmark images themselves plus 10% Gaussian noise, so nearest-neighbour
distances are small against the vector norms (the hard case for half-precision distances).

Measured, per model (images/s on one device):
- decode: PNG -> resized uint8 in a DataLoader process pool (`--decode-workers`), pinned batches;
- k-NN precision: fp32 (workers.knn.TorchShard) vs tf32/fp16/bf16 distance matmuls (fp32 accumulation),
  direct or re-ranked exactly in fp32 over the `--refine` best candidates: time and max |score diff|;
- variants (backbone precision x channels_last x k-NN x post-processing): GPU-only throughput over
  pre-decoded pinned batches (H2D included), a synchronised pass for the stage breakdown (H2D,
  backbone+embedding, k-NN, maps, D2H, stats), and the max |image score diff| against the fp32 baseline;
- end-to-end from the PNG files (decode pool overlapping the GPU) for the baseline and the fastest variant.
`post=gpu` is the worker's path (`patchaudit.workers.maps.map_stats_batch`: statistics computed on the device, only they
copied back; the worker copies a full map only for an image above the threshold, to draw its heatmap);
`post=host` is the worker's path until 2026-11-27 (every full-resolution map copied to the host, numpy `map_stats`).
"""

from __future__ import annotations

import sys

FORBIDDEN = ("faiss", "ray", "redis", "boto3")
for _name in FORBIDDEN:  # absent on the GPU host: make any import of them fail here too
    if _name not in sys.modules:
        sys.modules[_name] = None  # type: ignore[assignment]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

from patchaudit.workers.decode import Preprocess, decode_image  # noqa: E402
from patchaudit.workers.features import flatten_patches, patchcore_embed  # noqa: E402
from patchaudit.workers.knn import TorchShard  # noqa: E402
from patchaudit.workers.maps import map_stats, map_stats_batch, smooth_maps  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test"
DEFAULT_MODELS = ("wide_resnet50_2:1024", "tf_efficientnet_lite0")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
PREFETCH = 4  # batches each decode process prepares ahead


# --------------------------------------------------------------------------- decode pool


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> (uint8 (h, w, 3) tensor resized for the backbone, original (H, W)), as the worker decodes."""

    def __init__(self, paths: Sequence[Path], prep: Preprocess) -> None:
        self.paths = list(paths)
        self.prep = prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = decode_image(self.paths[i].read_bytes(), self.prep)
        pixels = np.require(img.pixels, requirements="W")  # PIL arrays are read-only; torch wants writable
        return torch.from_numpy(pixels), torch.tensor(img.original_size)


def list_images(folder: Path, repeat: int, max_images: int | None) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(
            f"error: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}; pass --images DIR "
            "(e.g. a copy of mvtec_ad/bottle/test) or --synthetic N"
        )
    paths = files * repeat
    return paths[:max_images] if max_images else paths


def write_synthetic(folder: Path, n: int, size: int = 900, seed: int = 0) -> None:
    """n bottle-sized RGB PNGs (smooth shading plus sensor noise, so they compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        base = 128 + 90 * np.sin(6 * xx + i) * np.cos(5 * yy - i)
        img = np.clip(base[..., None] + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"synthetic_{i:04d}.png")


def loader(ds: ImageFiles, batch: int, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=PREFETCH if workers else None,
        persistent_workers=False,
    )


# --------------------------------------------------------------------------- k-NN variants


class KnnSearch:
    """1-NN squared L2 over a bank: fp32 TorchShard, or a half/tf32 distance matmul with optional exact re-rank.

    Half modes compute ||b||^2 - 2 q.b from fp16/bf16 operands with fp32 accumulation (fp32 output where
    torch has `mm(out_dtype=)`), take the `refine` best candidates and recompute their distances
    exactly in fp32; refine=0 keeps the half distance (plus ||q||^2) as the answer. With `center`,
    bank and queries are shifted by the bank mean first: distances do not change, but the norms that
    cancel in the expansion shrink, and so does the rounding error (post-ReLU features share a large mean).
    """

    def __init__(self, bank: torch.Tensor, mode: str, refine: int = 0, center: bool = True) -> None:
        self.mode, self.refine = mode, refine
        self.mu = bank.mean(0) if center and mode != "fp32" else None  # (D,)
        ref = bank if self.mu is None else bank - self.mu
        self.shard = TorchShard(ref.cpu().numpy(), 0, device=str(bank.device))  # the worker's fp32 k-NN
        self.bank = self.shard.bank  # (N, D) fp32
        self.bank_sq = self.shard.bank_sq  # (N,)
        self.half = HALF.get(mode)
        self.bank_h = self.bank.to(self.half) if self.half is not None else None
        self.fp32_out = False
        if self.half is not None and self.bank.device.type == "cuda":
            try:
                torch.mm(self.bank_h[:2], self.bank_h[:2].T, out_dtype=torch.float32)
                self.fp32_out = True
            except (TypeError, RuntimeError, NotImplementedError):
                pass

    def search(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (M, D) fp32 on the bank's device -> (squared distance (M,), ids (M,))."""
        if self.mu is not None:
            q = q - self.mu
        if self.mode in ("fp32", "tf32"):
            prev = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if self.mode == "tf32" else "highest")
            try:
                if self.mode == "fp32" or not self.refine:
                    d, i = self.shard.search_tensor(q, 1)
                    return d[:, 0], i[:, 0]
                d, i = self.shard.search_tensor(q, self.refine)
                return self._rerank(q, i)
            finally:
                torch.set_float32_matmul_precision(prev)
        qh = q.to(self.half)
        if self.fp32_out:
            s = torch.mm(qh, self.bank_h.T, out_dtype=torch.float32)  # (M, N) q.b, fp32 accumulate and output
        else:
            s = torch.mm(qh, self.bank_h.T).float()  # fp32 accumulate, output rounded to half
        s = s.mul_(-2.0).add_(self.bank_sq)  # ||b||^2 - 2 q.b
        if not self.refine:
            d, i = s.min(1)
            return (d + (q * q).sum(1)).clamp_(min=0), i
        _, cand = torch.topk(s, min(self.refine, s.shape[1]), dim=1, largest=False)  # (M, r)
        return self._rerank(q, cand)

    def _rerank(self, q: torch.Tensor, cand: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact fp32 distances to each row's candidates (M, r): the best one per row."""
        ds, ids = [], []
        for s in range(0, q.shape[0], chunk):
            c = cand[s : s + chunk]
            diff = self.bank[c] - q[s : s + chunk, None, :]  # (m, r, D)
            d = (diff * diff).sum(2)  # (m, r)
            best, pos = d.min(1)
            ds.append(best)
            ids.append(torch.gather(c, 1, pos[:, None])[:, 0])
        return torch.cat(ds), torch.cat(ids)


# --------------------------------------------------------------------------- the compute path


@dataclass(frozen=True)
class Variant:
    precision: str  # fp32 | fp16 | bf16 (autocast around the backbone)
    channels_last: bool
    knn: str  # fp32 | tf32 | fp16 | bf16
    refine: int
    post: str  # gpu (stats on the device: the worker) | host (full maps to the host, numpy stats: the old worker)

    @property
    def name(self) -> str:
        r = f"+r{self.refine}" if self.refine and self.knn != "fp32" else ""
        return f"{self.precision}{'-cl' if self.channels_last else ''}/knn-{self.knn}{r}/post-{self.post}"


def to_original_batch(smaps: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
    """(B, H_in, W_in) smoothed maps -> each image's (H, W) map on the device (= maps.to_original, no crop).

    Images of one size are resized in one call; the list keeps the batch order.
    """
    out: list[torch.Tensor | None] = [None] * smaps.shape[0]
    for hw in {tuple(s) for s in sizes.tolist()}:
        idx = [j for j, s in enumerate(sizes.tolist()) if tuple(s) == hw]
        up = F.interpolate(smaps[idx, None], size=hw, mode="bilinear", align_corners=False)[:, 0]  # (b, H, W)
        for k, j in enumerate(idx):
            out[j] = up[k]
    return out  # type: ignore[return-value]


class Worker:
    """Backbone + patch embedding + k-NN + maps for one model, one variant at a time."""

    def __init__(
        self,
        name: str,
        layers: tuple[int, ...],
        feature_dim: int | None,
        device: torch.device,
        image_size: tuple[int, int],
        pretrained: bool,
        sigma: float = 4.0,
        patch_size: int = 3,
    ) -> None:
        self.name, self.device, self.image_size = name, device, image_size
        self.feature_dim, self.sigma, self.patch_size = feature_dim, sigma, patch_size
        self.backbone, self.weights = make_backbone(name, layers, device, pretrained)
        self.mean = torch.tensor(self.backbone.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.backbone.std, device=device).view(1, 3, 1, 1)
        self.knn: KnnSearch | None = None
        self._knn_key: tuple[int, str, int] | None = None
        self.variant: Variant | None = None
        self.threshold = 0.0

    def set_variant(self, v: Variant, bank: torch.Tensor | None = None) -> None:
        """Switch precision/memory format; with a bank, (re)build the k-NN for it (embedding alone: no bank)."""
        fmt = torch.channels_last if v.channels_last else torch.contiguous_format
        self.backbone.model.to(memory_format=fmt)
        self.backbone.channels_last = v.channels_last  # extract() converts its input to match
        if bank is not None and self._knn_key != (id(bank), v.knn, v.refine):
            self.knn = KnnSearch(bank, v.knn, v.refine)
            self._knn_key = (id(bank), v.knn, v.refine)
        self.variant = v

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, h, w, 3) on the host -> patch embeddings (B, D, h/8, w/8) fp32 on the device."""
        v = self.variant
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        x = x.sub_(self.mean).div_(self.std)  # same as workers.features.to_tensor_batch
        if v.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ac = torch.autocast(self.device.type, dtype=HALF[v.precision]) if v.precision in HALF else nullcontext()
        with ac:
            feats = self.backbone.extract(x)
        return patchcore_embed(feats, self.patch_size, self.feature_dim)

    def step(self, pixels: torch.Tensor, sizes: torch.Tensor, clock: Clock | None = None) -> np.ndarray:
        """One batch through the whole path; returns image scores (B,) float64 on the host."""
        clock = clock or Clock(self.device, enabled=False)
        clock.start()
        x = pixels.to(self.device, non_blocking=True)
        clock.lap("h2d")
        emb = self.embed(x)
        clock.lap("backbone")
        b, d, h, w = emb.shape
        dist, _ = self.knn.search(flatten_patches(emb))  # (B*h*w,)
        patch = dist.clamp(min=0).sqrt().view(b, h, w)
        scores = patch.view(b, -1).amax(1)
        clock.lap("knn")
        maps = to_original_batch(smooth_maps(patch, self.image_size, self.sigma), sizes)
        clock.lap("maps")
        scores_h = scores.double().cpu().numpy()
        if self.variant.post == "gpu":
            map_stats_batch(maps, self.threshold)  # device reductions + one small copy back
            clock.lap("d2h")
        else:
            host = [m.cpu().numpy() for m in maps]
            clock.lap("d2h")
            for m in host:
                map_stats(m, self.threshold)
            clock.lap("stats")
        return scores_h


def make_backbone(name: str, layers: tuple[int, ...], device: torch.device, pretrained: bool):
    """(workers.backbones.Backbone, weights label): random init unless `pretrained` (then resolved as in fit)."""
    import timm

    from patchaudit.workers.backbones import Backbone, ResolvedWeights, load_backbone
    from patchaudit.workers.inference_graph import optimize_for_inference

    if pretrained:
        bb = load_backbone(name, layers, device=device, allow_hub=False)
        return bb, bb.weights_source
    model = timm.create_model(name, pretrained=False, features_only=True, out_indices=layers)
    cfg = timm.get_pretrained_cfg(name)
    mean = tuple(getattr(cfg, "mean", None) or (0.485, 0.456, 0.406))
    std = tuple(getattr(cfg, "std", None) or (0.229, 0.224, 0.225))
    bb = Backbone(name, model, layers, ResolvedWeights({}, "", "random-init"), mean, std)
    bb.model, bb.folded_batchnorms = optimize_for_inference(bb.model, name)  # as load_backbone does
    bb.channels_last = True
    return bb.to(device), "random-init"


class Clock:
    """Stage timer: with `enabled`, synchronises the device at every lap (breakdown passes only)."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device, self.enabled = device, enabled
        self.totals: dict[str, float] = {}
        self.t = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.enabled:
            self._sync()
            now = time.perf_counter()
            self.totals[stage] = self.totals.get(stage, 0.0) + (now - self.t)
            self.t = now


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- measurements


def build_bank(
    worker: Worker, batches: list[tuple[torch.Tensor, torch.Tensor]], size: int, seed: int = 0
) -> torch.Tensor:
    """(size, D) fp32 on the device: sampled patch embeddings of the benchmark images plus 10% noise."""
    worker.set_variant(Variant("fp32", False, "fp32", 0, "gpu"))
    feats, n = [], 0
    with torch.inference_mode():
        for pixels, _ in batches:
            feats.append(flatten_patches(worker.embed(pixels)))
            n += feats[-1].shape[0]
            if n >= size:
                break
    f = torch.cat(feats)  # (M, D)
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, f.shape[0], (size,), generator=g).to(f.device)
    noise = torch.randn(size, f.shape[1], generator=g).to(f.device) * f.std(0, keepdim=True) * 0.1
    return (f[idx] + noise).contiguous()


def knn_precision(
    worker: Worker, bank: torch.Tensor, pixels: torch.Tensor, modes: Sequence[str], refine: int, reps: int
) -> list[dict[str, Any]]:
    """Each k-NN mode on one batch's queries: ms per image and max |score diff| against fp32."""
    with torch.inference_mode():
        worker.set_variant(Variant("fp32", False, "fp32", 0, "gpu"), bank)
        q = flatten_patches(worker.embed(pixels)).contiguous()  # (B*h*w, D)
        b = pixels.shape[0]
        ref_d, ref_i = KnnSearch(bank, "fp32").search(q)
        ref_patch = ref_d.sqrt().view(b, -1)
        runs = [("fp32", 0, False)]
        for mode in (m for m in modes if m != "fp32"):
            runs += [(mode, 0, True), (mode, refine, True), (mode, refine, False)]
        out = []
        for mode, r, center in runs:
            knn = KnnSearch(bank, mode, r, center)
            knn.search(q)  # warm-up
            sync(worker.device)
            t0 = time.perf_counter()
            for _ in range(reps):
                d, i = knn.search(q)
            sync(worker.device)
            ms = (time.perf_counter() - t0) / reps * 1e3
            patch = d.clamp(min=0).sqrt().view(b, -1)
            err = (patch - ref_patch).abs()
            out.append(
                {
                    "mode": mode,
                    "refine": r,
                    "centered": center,
                    "fp32_output": knn.fp32_out,
                    "ms_per_image": ms / b,
                    "max_abs_patch_diff": float(err.max()),
                    "mean_abs_patch_diff": float(err.mean()),
                    "max_abs_image_diff": float((patch.amax(1) - ref_patch.amax(1)).abs().max()),
                    "nn_id_changed": float((i != ref_i).float().mean()),
                    "image_score_scale": float(ref_patch.amax(1).mean()),
                }
            )
    return out


def run_variant(
    worker: Worker,
    v: Variant,
    bank: torch.Tensor,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    warmup: int,
    profile_batches: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """GPU-only throughput over pre-decoded batches, then a synchronised breakdown pass."""
    worker.set_variant(v, bank)
    if worker.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(worker.device)
    n = sum(p.shape[0] for p, _ in batches)
    with torch.inference_mode():
        for p, s in batches[:warmup]:
            worker.step(p, s)
        sync(worker.device)
        t0 = time.perf_counter()
        scores = np.concatenate([worker.step(p, s) for p, s in batches])
        sync(worker.device)
        seconds = time.perf_counter() - t0
        clock = Clock(worker.device)
        m = 0
        for p, s in batches[:profile_batches]:
            worker.step(p, s, clock)
            m += p.shape[0]
    peak = torch.cuda.max_memory_allocated(worker.device) / 2**20 if worker.device.type == "cuda" else None
    return {
        "variant": v.name,
        **asdict(v),
        "images": n,
        "images_per_s": n / seconds,
        "breakdown_ms_per_image": {k: t / m * 1e3 for k, t in clock.totals.items()},
        "finite_scores": bool(np.isfinite(scores).all()),
        "peak_gpu_mb": peak,
    }, scores


def run_e2e(worker: Worker, v: Variant, bank: torch.Tensor, ds: ImageFiles, args: argparse.Namespace) -> dict[str, Any]:
    """From the image files: the decode pool feeds pinned batches while the device computes."""
    worker.set_variant(v, bank)
    pin = worker.device.type == "cuda"
    n = first_n = 0
    t_start = time.perf_counter()
    t_first = None
    with torch.inference_mode():
        for pixels, sizes in loader(ds, args.batch_size, args.decode_workers, pin):
            worker.step(pixels, sizes)
            n += pixels.shape[0]
            if t_first is None:  # pool start-up and the first batch are not the steady state
                t_first, first_n = time.perf_counter(), n
    sync(worker.device)
    end = time.perf_counter()
    # The pool decodes ahead while the first batch is awaited (workers x prefetch x batch images): the rate
    # after the first batch only means something when the run is much longer than that read-ahead.
    read_ahead = max(args.decode_workers, 1) * PREFETCH * args.batch_size
    steady = (n - first_n) / (end - t_first) if n - first_n > 3 * read_ahead else None
    return {
        "variant": v.name,
        "images": n,
        "images_per_s": n / (end - t_start),
        "steady_images_per_s": steady,
        "read_ahead_images": read_ahead,
        "first_batch_s": t_first - t_start,
    }


def decode_pass(ds: ImageFiles, args: argparse.Namespace, pin: bool) -> tuple[dict[str, Any], list]:
    """Decode every image once in the pool: images/s, plus the decoded batches for the GPU-only passes."""
    t0 = time.perf_counter()
    batches = [(p, s) for p, s in loader(ds, args.batch_size, args.decode_workers, pin)]
    seconds = time.perf_counter() - t0
    one = ImageFiles(ds.paths[: min(8, len(ds))], ds.prep)
    t1 = time.perf_counter()
    for i in range(len(one)):
        one[i]
    per_image_ms = (time.perf_counter() - t1) / len(one) * 1e3
    return {
        "images": len(ds),
        "workers": args.decode_workers,
        "images_per_s": len(ds) / seconds,
        "one_process_ms_per_image": per_image_ms,
    }, batches


class RawDecode(torch.utils.data.Dataset):
    """Other PNG decoders, for their rate alone: not the product path, and their pixels are not scored.

    `pil-full`: PIL decode to RGB with no resize (the floor if resizing moved to the GPU);
    `cv2`: OpenCV imdecode + area resize; `tv`: torchvision's libpng decode_png + bilinear resize in torch.
    """

    def __init__(self, paths: Sequence[Path], kind: str, size: tuple[int, int]) -> None:
        self.paths, self.kind, self.size = list(paths), kind, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        data = self.paths[i].read_bytes()
        h, w = self.size
        if self.kind == "pil-full":
            import io

            from PIL import Image

            return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy())
        if self.kind == "cv2":
            import cv2

            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            return torch.from_numpy(cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)[..., ::-1].copy())
        if self.kind == "tv":
            import torchvision.io as tio

            img = tio.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), tio.ImageReadMode.RGB)
            return F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True)[0].to(torch.uint8)
        raise ValueError(f"unknown decoder {self.kind!r}")


def nvjpeg_rate(paths: Sequence[Path], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The same images re-encoded as JPEG (quality 95, not timed), decoded in batches on the GPU (nvJPEG via
    torchvision) and resized there: what the decode wall becomes when the archive holds JPEGs."""
    import torchvision.io as tio
    from PIL import Image

    unique = list(dict.fromkeys(paths))
    h, w = args.image_size
    with tempfile.TemporaryDirectory(prefix="pa_jpeg_") as tmp:
        files = {path: Path(tmp) / f"{i:05d}.jpg" for i, path in enumerate(unique)}
        for path, jpg in files.items():
            Image.open(path).convert("RGB").save(jpg, format="JPEG", quality=95)
        jpeg_mean_bytes = float(np.mean([jpg.stat().st_size for jpg in files.values()]))
        jpegs = [files[path] for path in paths]

        def run() -> int:
            n = 0
            for start in range(0, len(jpegs), args.batch_size):
                datas = [
                    torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8)
                    for f in jpegs[start : start + args.batch_size]
                ]
                imgs = tio.decode_jpeg(datas, mode=tio.ImageReadMode.RGB, device=device)
                batch = torch.stack(
                    [F.interpolate(im[None].float(), size=(h, w), mode="bilinear", antialias=True)[0] for im in imgs]
                )
                n += batch.shape[0]
            sync(device)
            return n

        run()  # warm-up: nvJPEG handles and kernels
        t0 = time.perf_counter()
        n = run()
        rate = n / (time.perf_counter() - t0)
    print(f"decoder nvjpeg (GPU): {rate:.1f} img/s", file=sys.stderr)
    return {
        "decoder": "nvjpeg-gpu",
        "images": n,
        "images_per_s": rate,
        "jpeg_mean_bytes": jpeg_mean_bytes,
        "png_mean_bytes": float(np.mean([p.stat().st_size for p in unique])),
    }


def decoder_rates(paths: Sequence[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Pool decode rate of each alternative decoder in `args.decoders` (a missing library is reported, not fatal)."""
    rows = []
    for kind in (k for k in args.decoders if k != "nvjpeg"):  # nvjpeg: GPU only, see nvjpeg_rate
        ds = RawDecode(paths, kind, tuple(args.image_size))
        try:
            ds[0]
        except Exception as exc:  # noqa: BLE001 - e.g. OpenCV not installed here: say so and go on
            rows.append({"decoder": kind, "error": f"{type(exc).__name__}: {exc}"})
            continue
        pool = torch.utils.data.DataLoader(
            ds,
            batch_size=args.batch_size,
            num_workers=args.decode_workers,
            collate_fn=list,
            prefetch_factor=PREFETCH if args.decode_workers else None,
        )
        t0 = time.perf_counter()
        n = sum(len(b) for b in pool)
        rows.append(
            {
                "decoder": kind,
                "images": n,
                "workers": args.decode_workers,
                "images_per_s": n / (time.perf_counter() - t0),
            }
        )
        print(f"decoder {kind}: {rows[-1]['images_per_s']:.1f} img/s", file=sys.stderr)
    return rows


def variants_for(device: torch.device, refine: int) -> list[Variant]:
    if device.type == "cuda":
        return [
            Variant("fp32", False, "fp32", 0, "host"),
            Variant("fp32", False, "fp32", 0, "gpu"),
            Variant("fp32", True, "fp32", 0, "gpu"),
            Variant("fp16", True, "fp16", refine, "host"),
            Variant("fp16", True, "fp16", refine, "gpu"),
            Variant("bf16", True, "bf16", refine, "gpu"),
        ]
    return [
        Variant("fp32", False, "fp32", 0, "host"),
        Variant("fp32", False, "fp32", 0, "gpu"),
        Variant("fp32", True, "fp32", 0, "gpu"),
        Variant("bf16", True, "bf16", refine, "gpu"),
    ]


def bench_model(
    spec: str, args: argparse.Namespace, device: torch.device, ds: ImageFiles, batches: list
) -> dict[str, Any]:
    name, _, dim = spec.partition(":")
    worker = Worker(name, tuple(args.layers), int(dim) if dim else None, device, ds.prep.image_size, args.pretrained)
    bank = build_bank(worker, batches, args.bank_size)
    knn_modes = ["fp32", "tf32", "fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    precision = knn_precision(worker, bank, batches[0][0], knn_modes, args.refine, args.knn_reps)
    with torch.inference_mode():  # a threshold for the map statistics: the median score of a first batch
        worker.set_variant(Variant("fp32", False, "fp32", 0, "gpu"), bank)
        worker.threshold = float(np.median(worker.step(*batches[0])))
    results, base = [], None
    for v in variants_for(device, args.refine):
        r, scores = run_variant(worker, v, bank, batches, args.warmup, args.profile_batches)
        base = scores if base is None else base
        r["max_abs_image_score_diff_vs_fp32"] = float(np.abs(scores - base).max())
        results.append(r)
        print(f"  {name} {v.name}: {r['images_per_s']:.1f} img/s (GPU-only)", file=sys.stderr)
    fastest = max(results, key=lambda r: r["images_per_s"])
    e2e = []
    picks = results[:2] + ([fastest] if all(fastest is not r for r in results[:2]) else [])
    for r in picks:  # the old worker path, the worker's, and the fastest variant
        v = Variant(r["precision"], r["channels_last"], r["knn"], r["refine"], r["post"])
        e2e.append(run_e2e(worker, v, bank, ds, args))
        print(f"  {name} {v.name}: {e2e[-1]['images_per_s']:.1f} img/s (end-to-end)", file=sys.stderr)
    return {
        "model": name,
        "layers": list(args.layers),
        "weights": worker.weights,
        "channels": worker.backbone.channels,
        "feature_dim": int(bank.shape[1]),
        "bank": [int(bank.shape[0]), int(bank.shape[1])],
        "threshold_used_for_stats": worker.threshold,
        "knn_precision": precision,
        "gpu_only": results,
        "end_to_end": e2e,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"device: {result['device']['name']}   decode pool: {result['decode']['images_per_s']:.1f} img/s "
        f"({result['decode']['workers']} workers, {result['decode']['one_process_ms_per_image']:.1f} ms/img "
        "in one process)"
    ]
    for d in result.get("decoders", []):
        lines.append(
            f"  other decoder {d['decoder']:<9} "
            + (f"{d['images_per_s']:.1f} img/s" if "images_per_s" in d else d["error"])
        )
    for m in result["models"]:
        lines.append(f"\n{m['model']} ({m['weights']}), bank {m['bank'][0]} x {m['bank'][1]}")
        lines.append(
            f"  {'variant':<40} {'img/s':>8} {'h2d':>6} {'backbone':>8} {'knn':>7} {'maps':>6} "
            f"{'d2h':>6} {'stats':>6} {'|dscore|':>9}"
        )
        for r in m["gpu_only"]:
            b = r["breakdown_ms_per_image"]
            cells = " ".join(
                f"{b.get(k, 0.0):>{w}.2f}"
                for k, w in (("h2d", 6), ("backbone", 8), ("knn", 7), ("maps", 6), ("d2h", 6), ("stats", 6))
            )
            lines.append(
                f"  {r['variant']:<40} {r['images_per_s']:>8.1f} {cells} {r['max_abs_image_score_diff_vs_fp32']:>9.2e}"
            )
        for e in m["end_to_end"]:
            lines.append(
                f"  end-to-end {e['variant']:<29} {e['images_per_s']:>8.1f} img/s "
                + (
                    f"(steady {e['steady_images_per_s']:.1f})"
                    if e["steady_images_per_s"]
                    else f"(run too short for a steady rate: {e['read_ahead_images']} images read ahead)"
                )
            )
        for k in m["knn_precision"]:
            lines.append(
                f"  knn {k['mode']:<5} refine {k['refine']:<2} {'centered' if k['centered'] else 'raw':<8} "
                f"{k['ms_per_image']:>8.3f} ms/img  "
                f"max|d image score| {k['max_abs_image_diff']:.2e}  max|d patch| {k['max_abs_patch_diff']:.2e}"
                f"  NN changed {k['nn_id_changed']:.2%}  (scores ~{k['image_score_scale']:.2f})"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=None, help=f"image folder (default: {DEFAULT_IMAGES} if present)")
    p.add_argument("--synthetic", type=int, default=0, help="use N generated 900x900 PNGs instead of --images")
    p.add_argument("--repeat", type=int, default=1, help="times the image list is repeated")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm names, NAME:DIM to pool to DIM")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    p.add_argument("--image-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    p.add_argument("--bank-size", type=int, default=None, help="default 20000 (2000 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (4 on CPU)")
    p.add_argument("--decode-workers", type=int, default=None, help="default: CPU count, at most 16")
    p.add_argument(
        "--decoders",
        nargs="*",
        default=["pil-full", "cv2", "tv", "nvjpeg"],
        help="alternative decoders whose rate is measured too (pil-full, cv2, tv; nvjpeg on a GPU)",
    )
    p.add_argument("--refine", type=int, default=8, help="candidates re-ranked in fp32 after a half k-NN")
    p.add_argument("--warmup", type=int, default=None, help="batches run before timing (default 2, 1 on CPU)")
    p.add_argument(
        "--profile-batches",
        type=int,
        default=None,
        help="batches in the synchronised breakdown pass (default 8, 2 on CPU)",
    )
    p.add_argument("--knn-reps", type=int, default=None, help="timed repetitions per k-NN mode (default 5, 1 on CPU)")
    p.add_argument(
        "--pretrained", action="store_true", help="resolve real weights (offline package/file) instead of random"
    )
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_worker.json if $OUT is set, else stdout)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    args.bank_size = args.bank_size or (2000 if cpu else 20000)
    args.batch_size = args.batch_size or (4 if cpu else 32)
    args.warmup = (1 if cpu else 2) if args.warmup is None else args.warmup
    args.profile_batches = args.profile_batches or (2 if cpu else 8)
    args.knn_reps = args.knn_reps or (1 if cpu else 5)
    if args.decode_workers is None:
        args.decode_workers = min(os.cpu_count() or 1, 16)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its convolution algorithms
        for flag in ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"):
            try:  # half matmuls accumulate in fp32 (older torch lacks the bf16 switch)
                setattr(torch.backends.cuda.matmul, flag, False)
            except AttributeError:
                pass
    with tempfile.TemporaryDirectory(prefix="pa_gpu_bench_") as tmp:
        folder = args.images
        if args.synthetic:
            folder = Path(tmp)
            write_synthetic(folder, args.synthetic)
        elif folder is None:
            folder = DEFAULT_IMAGES
        ds = ImageFiles(list_images(folder, args.repeat, args.max_images), Preprocess(tuple(args.image_size)))
        if len(ds) < args.batch_size:
            raise SystemExit(f"error: {len(ds)} images is less than one batch of {args.batch_size}")
        decode, batches = decode_pass(ds, args, pin=device.type == "cuda")
        print(f"decode: {decode['images_per_s']:.1f} img/s with {args.decode_workers} workers", file=sys.stderr)
        decoders = decoder_rates(ds.paths, args)
        if device.type == "cuda" and "nvjpeg" in args.decoders:
            decoders.append(nvjpeg_rate(ds.paths, args, device))
        models = [bench_model(spec, args, device, ds, batches) for spec in args.models]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "benchmark": "gpu_worker",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": {
            "type": device.type,
            "name": dev_name,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "images_source": "synthetic" if args.synthetic else str(folder),
        "forbidden_imports": list(FORBIDDEN),
        "decode": decode,
        "decoders": decoders,
        "models": models,
        "notes": [
            "random-init backbones unless settings.pretrained; timing does not depend on weight values",
            "bank: sampled patch embeddings of the benchmark images + 10% noise (synthetic)",
        ],
    }
    print(format_table(result), file=sys.stderr)
    text = json.dumps(result, indent=2)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_worker.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
