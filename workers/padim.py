"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization", ICPR 2020): one Gaussian per position of the finest feature grid.

Embedding: the chosen stages (typically strides 4, 8, 16) upsampled with nearest neighbour to the
finest grid (as the authors' code), concatenated, and a seeded random subset of d channels kept.
Fit: streaming per-position float64 moments (training embeddings are never held), then a regularised
covariance, its Cholesky factor L and W = L^-1 per position. Score: per-position Mahalanobis distance
||W (x - mean)||; the image score is the max of the upsampled, blurred map, which the caller computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from patchaudit.errors import ArtifactError, ConfigError
from patchaudit.workers.covariance import (
    DEFAULT_CHUNK,
    GaussianStatsError,
    MomentSums,
    check_eps,
    check_shrinkage,
    cholesky_factor,
    inverse_factor,
    mahalanobis,
)

ARRAY_KEYS = ("mean", "inv_chol", "channel_idx", "grid", "stage_channels", "n_samples")


def select_channels(stage_channels: Sequence[int], d: int = 100, seed: int = 0) -> Tensor:
    """A seeded random subset of d channel indices (sorted, int64) into the concatenated stages."""
    total = int(sum(stage_channels))
    if d < 1 or d > total:
        parts = "+".join(str(int(c)) for c in stage_channels)
        raise ConfigError(
            f"PaDiM d={d} must be between 1 and the {total} channels of the selected stages ({parts}); "
            f"choose d <= {total} or add feature stages"
        )
    idx = np.random.default_rng(seed).choice(total, size=d, replace=False)
    return torch.from_numpy(np.sort(idx).astype(np.int64))


def _check_features(features: Sequence[Tensor]) -> tuple[int, tuple[int, int]]:
    """Validate a feature list; return (batch size, finest grid (h, w))."""
    if len(features) == 0:
        raise GaussianStatsError("PaDiM needs at least one feature map, got an empty list")
    for i, f in enumerate(features):
        if f.ndim != 4:
            raise GaussianStatsError(f"feature map {i} must be (B, C, H, W), got shape {tuple(f.shape)}")
    b = features[0].shape[0]
    if any(f.shape[0] != b for f in features):
        raise GaussianStatsError(f"feature maps disagree on batch size: {[f.shape[0] for f in features]}")
    h, w = max((tuple(f.shape[-2:]) for f in features), key=lambda hw: hw[0] * hw[1])
    if any(f.shape[-2] > h or f.shape[-1] > w for f in features):
        sizes = [tuple(f.shape[-2:]) for f in features]
        raise GaussianStatsError(f"no feature map is finest in both height and width: {sizes}")
    return b, (h, w)


def _check_channel_idx(channel_idx: Tensor, total: int) -> None:
    if channel_idx.ndim != 1 or channel_idx.numel() == 0:
        raise GaussianStatsError(
            f"channel_idx must be a non-empty 1-D index tensor, got shape {tuple(channel_idx.shape)}"
        )
    if channel_idx.dtype not in (torch.int64, torch.int32):
        raise GaussianStatsError(f"channel_idx must be an int64 or int32 tensor, got {channel_idx.dtype}")
    if channel_idx.numel() > 1 and not bool((channel_idx[1:] > channel_idx[:-1]).all()):
        raise GaussianStatsError("channel_idx must be strictly increasing (use select_channels)")
    if int(channel_idx[0]) < 0 or int(channel_idx[-1]) >= total:
        raise GaussianStatsError(
            f"channel_idx must lie in [0, {total}) for these features, "
            f"got [{int(channel_idx[0])}, {int(channel_idx[-1])}]"
        )


def padim_embedding(features: Sequence[Tensor], channel_idx: Tensor) -> Tensor:
    """[(B, C_i, H_i, W_i), ...] -> (B, d, h, w) on the finest grid, channels `channel_idx` of the
    nearest-upsampled concatenation. Only the selected channels are upsampled."""
    _, (h, w) = _check_features(features)
    channels = [f.shape[1] for f in features]
    _check_channel_idx(channel_idx, sum(channels))
    idx = channel_idx.to(device=features[0].device, dtype=torch.int64)
    parts, offset = [], 0
    for f, c in zip(features, channels):
        local = idx[(idx >= offset) & (idx < offset + c)] - offset
        offset += c
        if local.numel() == 0:
            continue
        f = f.index_select(1, local)  # (B, k, H_i, W_i)
        if f.shape[-2:] != (h, w):
            f = F.interpolate(f, size=(h, w), mode="nearest")
        parts.append(f)
    return torch.cat(parts, dim=1)  # (B, d, h, w): sorted idx keeps the concatenation order


@dataclass(frozen=True, eq=False)
class PadimStats:
    """Fitted PaDiM statistics; tensors on CPU unless moved with `to`."""

    mean: Tensor  # (P, d), P = h * w, row-major over the grid
    inv_chol: Tensor  # (P, d, d) L^-1, lower triangular, where L L^T = regularised covariance
    channel_idx: Tensor  # (d,) int64 into the concatenated stage channels
    grid: tuple[int, int]  # (h, w)
    stage_channels: tuple[int, ...]  # channels of each stage the statistics were fitted on
    n_samples: int  # training images

    def to(self, device: str | torch.device) -> PadimStats:
        return PadimStats(
            self.mean.to(device),
            self.inv_chol.to(device),
            self.channel_idx.to(device),
            self.grid,
            self.stage_channels,
            self.n_samples,
        )

    @property
    def d(self) -> int:
        return int(self.channel_idx.numel())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (for .npy/.safetensors files; no pickle)."""
        return {
            "mean": self.mean.cpu().numpy(),
            "inv_chol": self.inv_chol.cpu().numpy(),
            "channel_idx": self.channel_idx.cpu().numpy().astype(np.int64),
            "grid": np.asarray(self.grid, dtype=np.int64),
            "stage_channels": np.asarray(self.stage_channels, dtype=np.int64),
            "n_samples": np.asarray([self.n_samples], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> PadimStats:
        """Rebuild from `to_arrays` output, checking keys, dtypes and shapes (ArtifactError if wrong)."""
        missing = [k for k in ARRAY_KEYS if k not in arrays]
        unknown = sorted(set(arrays) - set(ARRAY_KEYS))
        if missing or unknown:
            raise ArtifactError(
                f"PaDiM arrays: missing {missing}, unknown {unknown}; expected exactly {list(ARRAY_KEYS)}"
            )
        a = {k: np.asarray(arrays[k]) for k in ARRAY_KEYS}
        for k in ("channel_idx", "grid", "stage_channels", "n_samples"):
            if a[k].dtype.kind not in "iu" or a[k].ndim != 1:
                raise ArtifactError(f"PaDiM array {k!r} must be a 1-D integer array, got {a[k].dtype} {a[k].shape}")
        for k in ("mean", "inv_chol"):
            if a[k].dtype not in (np.float32, np.float64):
                raise ArtifactError(f"PaDiM array {k!r} must be float32 or float64, got {a[k].dtype}")
        if a["grid"].shape != (2,) or a["n_samples"].shape != (1,):
            raise ArtifactError(
                f"PaDiM arrays 'grid' and 'n_samples' must have 2 and 1 entries, got "
                f"{a['grid'].shape} and {a['n_samples'].shape}"
            )
        h, w = (int(v) for v in a["grid"])
        p, d = h * w, a["channel_idx"].shape[0]
        if a["mean"].shape != (p, d) or a["inv_chol"].shape != (p, d, d):
            raise ArtifactError(
                f"PaDiM arrays do not fit grid {h}x{w} and d={d}: mean {a['mean'].shape} (want {(p, d)}), "
                f"inv_chol {a['inv_chol'].shape} (want {(p, d, d)})"
            )
        if not (np.isfinite(a["mean"]).all() and np.isfinite(a["inv_chol"]).all()):
            raise ArtifactError("PaDiM arrays 'mean'/'inv_chol' contain NaN or Inf")
        if not (np.diagonal(a["inv_chol"], axis1=1, axis2=2) > 0).all():
            raise ArtifactError("PaDiM array 'inv_chol' is not an inverse Cholesky factor (non-positive diagonal)")
        channel_idx = torch.from_numpy(a["channel_idx"].astype(np.int64))
        stage_channels = tuple(int(c) for c in a["stage_channels"])
        try:
            _check_channel_idx(channel_idx, sum(stage_channels))
        except GaussianStatsError as exc:
            raise ArtifactError(f"PaDiM arrays: {exc}") from None
        return cls(
            torch.from_numpy(a["mean"].copy()),
            torch.from_numpy(a["inv_chol"].copy()),
            channel_idx,
            (h, w),
            stage_channels,
            int(a["n_samples"][0]),
        )


class PadimFitter:
    """Streaming PaDiM fit: `update(features)` per batch, then `finalize()`.

    Holds float64 per-position moments: about P * d^2 * 8 bytes (64x64 grid, d=100: 328 MB;
    d=176 on a 32x32 grid: 254 MB), on `device` (default: the first batch's device).
    """

    def __init__(
        self, channel_idx: Tensor, *, device: str | torch.device | None = None, chunk: int = DEFAULT_CHUNK
    ) -> None:
        self.channel_idx = torch.as_tensor(channel_idx).cpu()
        self.device, self.chunk = device, chunk
        self.grid: tuple[int, int] | None = None
        self.stage_channels: tuple[int, ...] | None = None
        self._sums: MomentSums | None = None

    @property
    def n_samples(self) -> int:
        return 0 if self._sums is None else self._sums.n

    def update(self, features: Sequence[Tensor]) -> None:
        """Accumulate one batch of backbone features [(B, C_i, H_i, W_i), ...]."""
        emb = padim_embedding(features, self.channel_idx)  # (B, d, h, w)
        b, d, h, w = emb.shape
        stages = tuple(int(f.shape[1]) for f in features)
        if self._sums is None:
            self.grid, self.stage_channels = (h, w), stages
            self._sums = MomentSums(h * w, d, device=self.device, chunk=self.chunk)
        elif (h, w) != self.grid or stages != self.stage_channels:
            raise GaussianStatsError(
                f"batch features (grid {h}x{w}, channels {stages}) differ from the first batch's "
                f"(grid {'x'.join(map(str, self.grid or ()))}, channels {self.stage_channels}); "
                "use one image size and backbone"
            )
        self._sums.update(emb.flatten(2).transpose(1, 2))  # (B, d, h, w) -> (B, P, d)

    def finalize(
        self, *, eps: float = 0.01, shrinkage: str | None = None, dtype: torch.dtype = torch.float32
    ) -> PadimStats:
        """Per-position mean and inverse Cholesky factor of cov + eps * I, stored in `dtype` on CPU.

        shrinkage=None: unbiased sample covariance (the paper, eps=0.01); "ledoit_wolf": the shrunk
        maximum-likelihood covariance per position. Needs at least 2 training images.
        """
        check_shrinkage(shrinkage)
        check_eps(eps)
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"PaDiM statistics dtype must be torch.float32 or torch.float64, got {dtype}")
        if self._sums is None or self._sums.n < 2 or self.grid is None or self.stage_channels is None:
            raise GaussianStatsError(f"PaDiM needs at least 2 training images, got {self.n_samples}")
        sums, p, d = self._sums, self._sums.groups, self._sums.dim
        inv_chol = torch.empty(p, d, d, dtype=dtype)
        for g0 in range(0, p, self.chunk):
            g1 = min(g0 + self.chunk, p)
            cov, _ = sums.covariance(g0, g1, shrinkage=shrinkage, eps=eps)  # (g, d, d) float64
            chol, _ = cholesky_factor(cov, chunk=self.chunk)
            inv_chol[g0:g1] = inverse_factor(chol, chunk=self.chunk).to("cpu", dtype)
        return PadimStats(
            sums.mean().to("cpu", dtype), inv_chol, self.channel_idx.clone(), self.grid, self.stage_channels, sums.n
        )


def padim_scores(stats: PadimStats, features: Sequence[Tensor], *, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Mahalanobis distance per grid position: features [(B, C_i, H_i, W_i), ...] -> (B, h, w).

    Computed in the statistics' dtype (float32 by default) on their device; move them with
    `stats.to(device)` once, not per batch.
    """
    stages = tuple(int(f.shape[1]) for f in features)
    if stages != stats.stage_channels:
        raise GaussianStatsError(
            f"features have stage channels {stages} but the PaDiM statistics were fitted on {stats.stage_channels}; "
            "use the backbone and layers the model was fitted with"
        )
    emb = padim_embedding(features, stats.channel_idx)  # (B, d, h, w)
    b, d, h, w = emb.shape
    if (h, w) != stats.grid:
        raise GaussianStatsError(
            f"feature grid {h}x{w} differs from the fitted grid {stats.grid[0]}x{stats.grid[1]}; "
            "use the image size the model was fitted with"
        )
    x = emb.flatten(2).transpose(1, 2)  # (B, P, d)
    return mahalanobis(x, stats.mean, stats.inv_chol, chunk=chunk).view(b, h, w)
