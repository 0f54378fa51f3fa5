"""Gaussian AD (Rippel et al., "Modeling the Distribution of Normal Data in Pre-Trained Deep Features
for Anomaly Detection", ICPR 2020): one multivariate Gaussian per feature stage of globally
average-pooled features, covariance by Ledoit-Wolf shrinkage.

Image score = sum over stages of the (not squared) Mahalanobis distances, as the authors' code does
(it averages the per-level distances, which ranks images identically). Squared distances would make
the deepest, widest stage dominate (a chi-square with C_i degrees of freedom has mean C_i). No map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from patchaudit.errors import ArtifactError, ConfigError
from patchaudit.workers.covariance import (
    GaussianStatsError,
    MomentSums,
    check_eps,
    check_shrinkage,
    cholesky_factor,
    inverse_factor,
    mahalanobis,
)


def pooled(features: Sequence[Tensor]) -> list[Tensor]:
    """Global average pooling: [(B, C_i, H_i, W_i), ...] -> [(B, C_i), ...] (at least float32)."""
    if len(features) == 0:
        raise GaussianStatsError("Gaussian AD needs at least one feature map, got an empty list")
    out = []
    for i, f in enumerate(features):
        if f.ndim != 4:
            raise GaussianStatsError(f"feature map {i} must be (B, C, H, W), got shape {tuple(f.shape)}")
        out.append(f.to(torch.promote_types(f.dtype, torch.float32)).mean(dim=(2, 3)))
    if any(p.shape[0] != out[0].shape[0] for p in out):
        raise GaussianStatsError(f"feature maps disagree on batch size: {[p.shape[0] for p in out]}")
    return out


@dataclass(frozen=True, eq=False)
class GaussianStats:
    """Per-stage mean and inverse Cholesky factor of the shrunk covariance; tensors on CPU unless moved."""

    means: tuple[Tensor, ...]  # [(C_i,), ...]
    inv_chols: tuple[Tensor, ...]  # [(C_i, C_i), ...] L^-1, lower triangular, L L^T = covariance
    n_samples: int

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(int(m.shape[0]) for m in self.means)

    def to(self, device: str | torch.device) -> GaussianStats:
        return GaussianStats(
            tuple(m.to(device) for m in self.means), tuple(c.to(device) for c in self.inv_chols), self.n_samples
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays: mean_{i}, inv_chol_{i} per stage i, and n_samples (no pickle)."""
        out: dict[str, np.ndarray] = {"n_samples": np.asarray([self.n_samples], dtype=np.int64)}
        for i, (m, c) in enumerate(zip(self.means, self.inv_chols)):
            out[f"mean_{i}"] = m.cpu().numpy()
            out[f"inv_chol_{i}"] = c.cpu().numpy()
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> GaussianStats:
        """Rebuild from `to_arrays` output, checking keys, dtypes and shapes (ArtifactError if wrong)."""
        n_stages = sum(1 for k in arrays if k.startswith("mean_"))
        expected = {"n_samples"} | {f"{p}_{i}" for i in range(n_stages) for p in ("mean", "inv_chol")}
        if n_stages == 0 or set(arrays) != expected:
            raise ArtifactError(
                f"Gaussian AD arrays must be exactly n_samples, mean_0..mean_{{S-1}}, inv_chol_0..inv_chol_{{S-1}}; "
                f"got {sorted(arrays)}"
            )
        n = np.asarray(arrays["n_samples"])
        if n.shape != (1,) or n.dtype.kind not in "iu":
            raise ArtifactError(f"Gaussian AD array 'n_samples' must be one integer, got {n.dtype} {n.shape}")
        means, inv_chols = [], []
        for i in range(n_stages):
            m, c = np.asarray(arrays[f"mean_{i}"]), np.asarray(arrays[f"inv_chol_{i}"])
            if m.dtype not in (np.float32, np.float64) or c.dtype != m.dtype:
                raise ArtifactError(
                    f"Gaussian AD stage {i}: mean/inv_chol must both be float32 or float64, got {m.dtype}/{c.dtype}"
                )
            if m.ndim != 1 or c.shape != (m.shape[0], m.shape[0]):
                raise ArtifactError(
                    f"Gaussian AD stage {i}: mean {m.shape} and inv_chol {c.shape} must be (C,) and (C, C)"
                )
            if not (np.isfinite(m).all() and np.isfinite(c).all() and (np.diagonal(c) > 0).all()):
                raise ArtifactError(f"Gaussian AD stage {i}: non-finite values or a non-positive inv_chol diagonal")
            means.append(torch.from_numpy(m.copy()))
            inv_chols.append(torch.from_numpy(c.copy()))
        return cls(tuple(means), tuple(inv_chols), int(n[0]))


class GaussianFitter:
    """Streaming Gaussian AD fit: `update(features)` per batch, then `finalize()`.

    Keeps float64 moment sums per stage (C_i^2 * 8 bytes each: 25 MB for 1792 channels), so memory
    does not grow with the number of training images.
    """

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        self.device = device
        self._sums: list[MomentSums] | None = None

    @property
    def n_samples(self) -> int:
        return 0 if self._sums is None else self._sums[0].n

    def update(self, features: Sequence[Tensor]) -> None:
        """Accumulate one batch of backbone features [(B, C_i, H_i, W_i), ...]."""
        vecs = pooled(features)  # [(B, C_i), ...]
        channels = tuple(v.shape[1] for v in vecs)
        if self._sums is None:
            self._sums = [MomentSums(1, c, device=self.device) for c in channels]
        elif channels != tuple(s.dim for s in self._sums):
            raise GaussianStatsError(
                f"batch feature channels {channels} differ from the first batch's {tuple(s.dim for s in self._sums)}"
            )
        for s, v in zip(self._sums, vecs):
            s.update(v[:, None, :])  # (B, 1, C_i)

    def finalize(
        self, *, eps: float = 1e-6, shrinkage: str | None = "ledoit_wolf", dtype: torch.dtype = torch.float32
    ) -> GaussianStats:
        """Per-stage mean and inverse Cholesky factor of (Ledoit-Wolf covariance + eps * I), in `dtype`."""
        check_shrinkage(shrinkage)
        check_eps(eps)
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"Gaussian AD statistics dtype must be torch.float32 or torch.float64, got {dtype}")
        if self._sums is None or self.n_samples < 2:
            raise GaussianStatsError(f"Gaussian AD needs at least 2 training images, got {self.n_samples}")
        means, inv_chols = [], []
        for s in self._sums:
            cov, _ = s.covariance(shrinkage=shrinkage, eps=eps)  # (1, C, C)
            means.append(s.mean()[0].to("cpu", dtype))
            inv_chols.append(inverse_factor(cholesky_factor(cov)[0])[0].to("cpu", dtype))
        return GaussianStats(tuple(means), tuple(inv_chols), self.n_samples)


def gaussian_stage_distances(stats: GaussianStats, features: Sequence[Tensor]) -> Tensor:
    """Per-stage Mahalanobis distances: features [(B, C_i, H_i, W_i), ...] -> (B, S), in the stats' dtype."""
    vecs = pooled(features)
    channels = tuple(v.shape[1] for v in vecs)
    if channels != stats.stage_channels:
        raise GaussianStatsError(
            f"features have stage channels {channels} but the Gaussian AD statistics were fitted on "
            f"{stats.stage_channels}; use the backbone and layers the model was fitted with"
        )
    return torch.stack([mahalanobis(v, m, w) for v, m, w in zip(vecs, stats.means, stats.inv_chols)], dim=1)


def gaussian_scores(stats: GaussianStats, features: Sequence[Tensor]) -> Tensor:
    """Image scores (B,): sum over stages of the Mahalanobis distances."""
    return gaussian_stage_distances(stats, features).sum(1)
