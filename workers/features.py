"""Patch features: image batches to backbone input, and PatchCore's locally aware patch embedding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor_batch(
    images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Stack uint8 (h, w, 3) images into a normalised float batch (B, 3, h, w) on `device`."""
    arr = torch.from_numpy(np.stack(images))  # (B, h, w, 3) uint8
    x = arr.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


def patchcore_embed(feats: Sequence[torch.Tensor], patch_size: int = 3, feature_dim: int | None = None) -> torch.Tensor:
    """PatchCore's patch embedding (Roth et al. 2022, sec. 3.1).

    Each stage map is aggregated over its local `patch_size` neighbourhood (average pooling, borders
    averaged over the pixels that exist instead of diluted with zero padding), deeper maps are
    upsampled bilinearly to the first (finest) map's grid, and all are concatenated along channels.
    With `feature_dim`, the concatenated vector is average-pooled down to that many channels
    (the paper's "pretrain/target embed dimension" reduction).

    feats: [(B, C_i, H_i, W_i), ...] finest first -> (B, D, H_0, W_0)
    """
    if not feats:
        raise ValueError("patchcore_embed needs at least one feature map")
    h0, w0 = feats[0].shape[-2:]
    pad = patch_size // 2
    out = []
    for f in feats:
        f = f.float()
        if patch_size > 1:
            f = F.avg_pool2d(f, patch_size, stride=1, padding=pad, count_include_pad=False)
        if f.shape[-2:] != (h0, w0):
            f = F.interpolate(f, size=(h0, w0), mode="bilinear", align_corners=False)
        out.append(f)
    emb = torch.cat(out, dim=1)  # (B, sum C_i, H_0, W_0)
    if feature_dim is not None and feature_dim != emb.shape[1]:
        b, c, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(-1, 1, c)  # (B*H*W, 1, C)
        flat = F.adaptive_avg_pool1d(flat, feature_dim)  # (B*H*W, 1, feature_dim)
        emb = flat.reshape(b, h, w, feature_dim).permute(0, 3, 1, 2)
    return emb.contiguous()


def flatten_patches(emb: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B*h*w, D), row-major over (image, y, x)."""
    b, d, h, w = emb.shape
    return emb.permute(0, 2, 3, 1).reshape(b * h * w, d)
