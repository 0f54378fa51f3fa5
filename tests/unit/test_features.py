"""Tests for workers.features: batch normalisation and PatchCore's locally aware patch embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchaudit.workers.features import flatten_patches, patchcore_embed, to_tensor_batch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def local_mean(f: torch.Tensor, y: int, x: int, p: int = 3) -> torch.Tensor:
    """Reference aggregation at one position: mean over the p x p window clipped to the map. (B, C)."""
    r = p // 2
    h, w = f.shape[-2:]
    return f[:, :, max(0, y - r) : min(h, y + r + 1), max(0, x - r) : min(w, x + r + 1)].mean(dim=(2, 3))


def feats(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, 10, generator=g), torch.randn(2, 6, 4, 5, generator=g)]  # finest first


# --------------------------------------------------------------------------- to_tensor_batch


def test_to_tensor_batch_normalises():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(3)]
    keep = [im.copy() for im in images]
    x = to_tensor_batch(images, MEAN, STD)
    assert x.shape == (3, 3, 5, 7) and x.dtype == torch.float32
    for b, im in enumerate(images):
        for c in range(3):  # channel c of the tensor is channel c of the image, normalised per channel
            ref = (im[..., c].astype(np.float64) / 255.0 - MEAN[c]) / STD[c]
            np.testing.assert_allclose(x[b, c].numpy(), ref, rtol=1e-5, atol=1e-5)
    for im, k in zip(images, keep):
        np.testing.assert_array_equal(im, k)  # inputs untouched by the in-place ops


def test_to_tensor_batch_extremes():
    black = np.zeros((2, 2, 3), dtype=np.uint8)
    white = np.full((2, 2, 3), 255, dtype=np.uint8)
    x = to_tensor_batch([black, white], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.all(x[0] == -1.0) and torch.all(x[1] == 1.0)


# --------------------------------------------------------------------------- patchcore_embed


def test_embed_shape_and_channel_order():
    f0, f1 = feats()
    emb = patchcore_embed([f0, f1])
    assert emb.shape == (2, 4 + 6, 8, 10) and emb.dtype == torch.float32 and emb.is_contiguous()
    # first the finest map's (aggregated) channels, then the upsampled deeper ones
    pooled1 = torch.stack([torch.stack([local_mean(f1, y, x) for x in range(5)], -1) for y in range(4)], -2)
    up1 = F.interpolate(pooled1, size=(8, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(emb[:, 4:], up1)


def test_embed_interior_is_3x3_mean():
    f0, f1 = feats(1)
    emb = patchcore_embed([f0, f1])
    for y, x in [(3, 4), (1, 1), (6, 8)]:
        manual = torch.zeros(2, 4)
        for dy in (-1, 0, 1):  # an explicit loop, on purpose independent of local_mean
            for dx in (-1, 0, 1):
                manual += f0[:, :, y + dy, x + dx]
        torch.testing.assert_close(emb[:, :4, y, x], manual / 9)


def test_embed_border_without_zero_dilution():
    f0, f1 = feats(2)
    emb = patchcore_embed([f0, f1])
    for y, x in [(0, 0), (0, 5), (7, 9), (4, 0)]:
        torch.testing.assert_close(emb[:, :4, y, x], local_mean(f0, y, x))  # corner: 2x2 mean, edge: 2x3
    const = [torch.full((1, 3, 6, 6), 2.5), torch.full((1, 5, 3, 3), -1.0)]
    out = patchcore_embed(const)
    torch.testing.assert_close(out[:, :3], torch.full((1, 3, 6, 6), 2.5))  # borders included
    torch.testing.assert_close(out[:, 3:], torch.full((1, 5, 6, 6), -1.0))


@pytest.mark.parametrize("patch_size", [1, 5])
def test_embed_patch_size(patch_size):
    f0, _ = feats(3)
    emb = patchcore_embed([f0], patch_size=patch_size)
    assert emb.shape == f0.shape
    if patch_size == 1:
        torch.testing.assert_close(emb, f0)  # no aggregation
    else:
        torch.testing.assert_close(emb[:, :, 4, 5], local_mean(f0, 4, 5, p=5))
        torch.testing.assert_close(emb[:, :, 0, 0], local_mean(f0, 0, 0, p=5))


def test_embed_feature_dim_reduces_channels():
    f0, f1 = feats(4)
    full = patchcore_embed([f0, f1])  # (2, 10, 8, 10)
    red = patchcore_embed([f0, f1], feature_dim=5)
    assert red.shape == (2, 5, 8, 10) and red.is_contiguous()
    # 10 -> 5 channels by adaptive average pooling: the mean of each consecutive pair
    torch.testing.assert_close(red, full.view(2, 5, 2, 8, 10).mean(2))
    torch.testing.assert_close(patchcore_embed([f0, f1], feature_dim=10), full)  # same width: untouched
    red3 = patchcore_embed([f0, f1], feature_dim=3)
    assert red3.shape == (2, 3, 8, 10)
    torch.testing.assert_close(red3[:, 0], full[:, 0:4].mean(1))  # adaptive bins of 10 into 3: [0,4) [3,7) [6,10)
    torch.testing.assert_close(red3[:, 2], full[:, 6:10].mean(1))


def test_embed_half_precision_input():
    f0, f1 = feats(5)
    emb = patchcore_embed([f0.half(), f1.half()])
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, patchcore_embed([f0.half().float(), f1.half().float()]))


def test_embed_needs_a_map():
    with pytest.raises(ValueError, match="at least one"):
        patchcore_embed([])


# --------------------------------------------------------------------------- flatten_patches


def test_flatten_patches_order():
    b, d, h, w = 2, 3, 4, 5
    emb = torch.arange(b * d * h * w, dtype=torch.float32).view(b, d, h, w)
    flat = flatten_patches(emb)
    assert flat.shape == (b * h * w, d)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                torch.testing.assert_close(flat[i * h * w + y * w + x], emb[i, :, y, x])
