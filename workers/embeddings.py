"""Compact per-image embeddings for dataset mining: a pooled feature vector and the feature at the map's peak.

Computed in the worker from the features the method already extracted (no second backbone pass):
    pooled: the mean of the method's patch-feature grid over all positions, (D,)
    peak:   the patch feature at the position of the anomaly map's maximum, (D,); none for methods
            without a map (Gaussian AD)
Both are L2-normalised and stored as float16, so similarity is a cosine (an inner product).

The "embedding space" is a short fingerprint of everything that fixes what a vector means (method
kind, backbone and its weights, layers, input size, and the method's own channel choice). Vectors of
two reports are comparable exactly when their spaces are equal: a PatchCore model of bottles and one
of tiles with the same backbone settings share a space; PaDiM's random channel subset depends on its
seed, so it is part of the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from patchaudit.workers.model import AnomalyModel


@dataclass(frozen=True)
class BatchEmbeddings:
    pooled: np.ndarray  # (B, D) float16, L2-normalised
    peak: np.ndarray | None  # (B, D) float16, L2-normalised; None for methods without a map


def feature_grid(model: AnomalyModel, emb: Any) -> tuple[torch.Tensor, bool]:
    """The method's patch features as (B, D, h, w) and whether a peak position is meaningful.

    PatchCore: its locally aware patch embedding (what the memory bank holds). PaDiM: the selected
    channels on the finest grid (what its Gaussians model). Gaussian AD: every stage globally pooled
    and concatenated, as a 1x1 grid (image-level method: no peak).
    """
    if isinstance(emb, torch.Tensor):
        return emb, True
    if model.method == "padim":
        from patchaudit.workers.padim import padim_embedding

        return padim_embedding(emb, model.stats.channel_idx), True  # type: ignore[attr-defined]
    pooled = [f.float().mean(dim=(2, 3)) for f in emb]  # [(B, C_i)]
    return torch.cat(pooled, dim=1)[:, :, None, None], False


def compute(model: AnomalyModel, emb: Any, maps: torch.Tensor | None) -> BatchEmbeddings:
    """Embeddings of one batch. `maps` (B, H, W): the smoothed anomaly maps at input resolution (or the
    patch-grid maps); the peak is taken where the map the report's peak comes from is largest."""
    grid, has_peak = feature_grid(model, emb)
    grid = grid.float()
    b, d, h, w = grid.shape
    pooled = F.normalize(grid.mean(dim=(2, 3)), dim=1)  # (B, D)
    peak = None
    if has_peak and maps is not None:
        mh, mw = maps.shape[-2:]
        flat = maps.reshape(b, -1).argmax(1)  # (B,)
        py = torch.div(flat, mw, rounding_mode="floor").clamp(max=mh - 1)
        px = (flat % mw).clamp(max=mw - 1)
        gy = (py * h).div(mh, rounding_mode="floor").clamp(max=h - 1).to(grid.device)  # map pixel -> grid cell
        gx = (px * w).div(mw, rounding_mode="floor").clamp(max=w - 1).to(grid.device)
        rows = torch.arange(b, device=grid.device)
        peak_vec = grid.permute(0, 2, 3, 1)[rows, gy, gx]  # (B, D)
        peak = F.normalize(peak_vec, dim=1).cpu().numpy().astype(np.float16)
    return BatchEmbeddings(pooled.cpu().numpy().astype(np.float16), peak)


def embedding_space(model: AnomalyModel) -> str:
    """A short fingerprint of what the vectors mean; equal spaces are comparable."""
    cfg = model.config
    bb = model.backbone
    desc: dict[str, Any] = {
        "kind": model.method,
        "backbone": bb.name,
        "weights": bb.weights_sha256,
        "layers": list(cfg.layers),
        "image_size": list(cfg.image_size),
        "center_crop": list(cfg.center_crop) if cfg.center_crop else None,
        "geometry": getattr(cfg, "geometry", "squash"),
    }
    if desc["geometry"] == "tile":
        desc.update(tile_size=cfg.tile_size, tile_scale=getattr(cfg, "tile_scale", 1.0))
    if model.method == "patchcore":
        desc.update(patch_size=cfg.patchcore.patch_size, feature_dim=cfg.patchcore.feature_dim)
    elif model.method == "padim":
        desc.update(n_features=cfg.padim.n_features, seed=cfg.seed)
    text = json.dumps(desc, sort_keys=True)
    return f"{model.method}-{bb.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
