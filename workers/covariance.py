"""Gaussian statistics shared by PaDiM and Gaussian AD: streaming moments, Ledoit-Wolf shrinkage,
Cholesky factors and Mahalanobis distances, batched over many independent Gaussians ("groups",
e.g. the positions of a PaDiM grid).

Numerics: sums, Cholesky factors L and their inverses W = L^-1 are float64; scoring is one batched
matmul ||W (x - mu)|| in W's dtype (float32 unless the caller keeps float64). Nothing here calls
`torch.linalg.inv`/`solve` (LU): on the CPU build we ship (MKL) with 2 threads, batched LU of
150x150 or larger matrices hangs (n == 150) or fails with "Pivots given to lu_solve must all be
greater or equal to 1" after MKL prints "Parameter 6 was incorrect on entry to DLASWP" (n >= 151,
batch >= 2); one thread or a batch of one works. Batched Cholesky and triangular solves are correct.
Scoring uses a matmul rather than a triangular solve per call because per-matrix LAPACK calls with
2+ threads slow down 10-50x when the CPU is oversubscribed, while one large matmul does not.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from patchaudit.errors import ConfigError, PatchauditError

log = logging.getLogger(__name__)

SHRINKAGE_METHODS = (None, "ledoit_wolf")

# Positions per chunk for the (G, d, d) work: bounds temporaries to chunk * d * d * 8 bytes
# (82 MB at d = 100) while keeping batched LAPACK calls large enough to be fast.
DEFAULT_CHUNK = 1024


class GaussianStatsError(PatchauditError):
    """Gaussian statistics cannot be fitted or applied: too few samples, non-finite features,
    a covariance that stays singular, or features that do not match the fitted statistics."""


def check_shrinkage(shrinkage: str | None) -> None:
    if shrinkage not in SHRINKAGE_METHODS:
        raise ConfigError(f"unknown covariance shrinkage {shrinkage!r}; valid: None (sample covariance), 'ledoit_wolf'")


def check_eps(eps: float) -> None:
    if not (eps >= 0 and math.isfinite(eps)):
        raise ConfigError(f"covariance eps must be a finite number >= 0, got {eps}")


# -- Ledoit-Wolf ----------------------------------------------------------------------------------


def ledoit_wolf_shrinkage(cov: Tensor, fourth: Tensor, n: int) -> Tensor:
    """Ledoit-Wolf (2004) shrinkage intensity towards mu*I, batched (same formula as sklearn).

    cov: (..., d, d) maximum-likelihood covariance (divided by n); fourth: (...,) the mean over
    samples of ||x_k - mean||^4; n: number of samples. Returns (...,) in [0, 1].
    """
    d = cov.shape[-1]
    mu = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / d  # (...,)
    fro2 = cov.square().sum((-2, -1))  # ||S||_F^2
    # ||S - mu I||_F^2 / d, expanded: tr(S) = d * mu
    delta = (fro2 - d * mu.square()) / d
    beta = (fourth - fro2) / (d * n)
    beta = torch.minimum(beta.clamp(min=0.0), delta)
    return torch.where(delta > 0, beta / delta.clamp(min=torch.finfo(cov.dtype).tiny), torch.zeros_like(delta))


def shrink(cov: Tensor, shrinkage: Tensor) -> Tensor:
    """(1 - s) * S + s * mu * I with mu = tr(S) / d. cov (..., d, d), shrinkage (...,)."""
    d = cov.shape[-1]
    mu = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / d
    out = cov * (1.0 - shrinkage)[..., None, None]
    torch.diagonal(out, dim1=-2, dim2=-1).add_((shrinkage * mu)[..., None])
    return out


def ledoit_wolf(x: Tensor) -> tuple[Tensor, Tensor]:
    """One-shot Ledoit-Wolf estimate from samples x (..., N, d) -> (covariance (..., d, d), shrinkage (...,)).

    float64; the covariance is the shrunk maximum-likelihood one, as sklearn's `LedoitWolf().covariance_`.
    """
    x = x.double()
    n = x.shape[-2]
    xc = x - x.mean(-2, keepdim=True)
    cov = xc.mT @ xc / n  # (..., d, d)
    fourth = xc.square().sum(-1).square().mean(-1)  # (...,)
    s = ledoit_wolf_shrinkage(cov, fourth, n)
    return shrink(cov, s), s


# -- streaming moments ----------------------------------------------------------------------------


class MomentSums:
    """Streaming float64 sums for G independent d-dimensional Gaussians, never holding the samples.

    Samples are shifted by the first batch's mean before summing (covariance is shift invariant),
    which avoids the cancellation of sum(x x^T)/n - m m^T when features have a large mean. Besides
    sum(y) and sum(y y^T) it keeps sum(||y||^2 y) and sum(||y||^4), which is all Ledoit-Wolf needs.
    Memory: G * d * d * 8 bytes for the outer products (4096 x 100 x 100: 328 MB).
    """

    def __init__(
        self, groups: int, dim: int, *, device: str | torch.device | None = None, chunk: int = DEFAULT_CHUNK
    ) -> None:
        if groups < 1 or dim < 1:
            raise GaussianStatsError(f"MomentSums needs groups >= 1 and dim >= 1, got groups={groups}, dim={dim}")
        self.groups, self.dim, self.chunk = groups, dim, max(1, chunk)
        self.device = torch.device(device) if device is not None else None
        self.n = 0
        self.shift: Tensor | None = None  # (G, d)
        # sums allocated on the first batch's device (by `update`, before anything reads them)
        self._s1: Tensor
        self._s2: Tensor
        self._a2: Tensor
        self._a4: Tensor

    def _allocate(self, device: torch.device) -> None:
        g, d, f64 = self.groups, self.dim, torch.float64
        self._s1 = torch.zeros(g, d, dtype=f64, device=device)  # sum y
        self._s2 = torch.zeros(g, d, d, dtype=f64, device=device)  # sum y y^T
        self._a2 = torch.zeros(g, d, dtype=f64, device=device)  # sum ||y||^2 y
        self._a4 = torch.zeros(g, dtype=f64, device=device)  # sum ||y||^4

    def update(self, x: Tensor) -> None:
        """Add samples x (N, G, d)."""
        if x.ndim != 3 or x.shape[1:] != (self.groups, self.dim):
            raise GaussianStatsError(f"expected samples of shape (N, {self.groups}, {self.dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        if self.shift is None:
            device = self.device if self.device is not None else x.device
            self._allocate(device)
            self.shift = x.to(device=device, dtype=torch.float64).mean(0)  # (G, d)
        for g0 in range(0, self.groups, self.chunk):
            g1 = min(g0 + self.chunk, self.groups)
            # (N, g, d) -> (g, N, d), contiguous so the batched matmul gets plain row-major blocks
            yt = (
                x[:, g0:g1]
                .transpose(0, 1)
                .to(device=self.shift.device, dtype=torch.float64, copy=True, memory_format=torch.contiguous_format)
            )
            yt -= self.shift[g0:g1, None, :]
            if not torch.isfinite(yt).all():
                raise GaussianStatsError("features contain NaN or Inf values; cannot fit Gaussian statistics")
            self._s1[g0:g1] += yt.sum(1)
            self._s2[g0:g1].baddbmm_(yt.mT, yt)  # (g, d, N) @ (g, N, d)
            a = yt.square().sum(-1)  # (g, N) ||y||^2
            self._a2[g0:g1] += torch.bmm(a[:, None, :], yt)[:, 0]  # (g, d)
            self._a4[g0:g1] += a.square().sum(1)
        self.n += x.shape[0]

    def _check_n(self, need: int) -> None:
        if self.n < need:
            raise GaussianStatsError(f"need at least {need} training samples to estimate a covariance, got {self.n}")

    def mean(self) -> Tensor:
        """(G, d) float64."""
        self._check_n(1)
        return self.shift + self._s1 / self.n

    def moments(self, g0: int = 0, g1: int | None = None) -> tuple[Tensor, Tensor]:
        """(ML covariance (g, d, d), mean ||x - m||^4 (g,)) for groups g0:g1, float64."""
        self._check_n(1)
        g1 = self.groups if g1 is None else g1
        n = self.n
        m = self._s1[g0:g1] / n  # (g, d) mean of the shifted samples
        s2 = self._s2[g0:g1]
        cov = torch.baddbmm(s2, m[:, :, None], m[:, None, :], beta=1.0 / n, alpha=-1.0)  # s2/n - m m^T
        # sum ||y - m||^4 = sum (a - 2b + c)^2 with a = ||y||^2, b = y.m, c = ||m||^2
        c = m.square().sum(-1)  # (g,)
        m_s2_m = torch.einsum("gi,gij,gj->g", m, s2, m)
        tr_s2 = torch.diagonal(s2, dim1=-2, dim2=-1).sum(-1)
        total = self._a4[g0:g1] + 4 * m_s2_m - 4 * (m * self._a2[g0:g1]).sum(-1) + 2 * c * tr_s2 - 3 * n * c.square()
        return cov, (total / n).clamp(min=0.0)

    def covariance(
        self, g0: int = 0, g1: int | None = None, *, shrinkage: str | None = None, eps: float = 0.0
    ) -> tuple[Tensor, Tensor]:
        """Regularised covariance for groups g0:g1 -> (cov (g, d, d), shrinkage intensity (g,)), float64.

        shrinkage=None: unbiased sample covariance (divided by n - 1, as np.cov); "ledoit_wolf": the
        shrunk maximum-likelihood covariance. Either way eps * I is added on top: the floor that keeps
        rank-deficient covariances (N < d, duplicated or constant channels) positive definite.
        """
        check_shrinkage(shrinkage)
        check_eps(eps)
        self._check_n(2)
        cov, fourth = self.moments(g0, g1)
        if shrinkage == "ledoit_wolf":
            s = ledoit_wolf_shrinkage(cov, fourth, self.n)
            cov = shrink(cov, s)
        else:
            s = torch.zeros(cov.shape[0], dtype=cov.dtype, device=cov.device)
            cov.mul_(self.n / (self.n - 1))
        torch.diagonal(cov, dim1=-2, dim2=-1).add_(eps)  # in place: cov is ours
        return cov, s


# -- factorisation and distances ------------------------------------------------------------------


def cholesky_factor(cov: Tensor, *, chunk: int = DEFAULT_CHUNK, max_tries: int = 5) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factors of symmetric covariances (..., d, d) -> (L (..., d, d), jitter (...,)).

    Runs `cholesky_ex` in chunks of `chunk` matrices (as fast as one call, bounded temporaries).
    A matrix that is not numerically positive definite is retried alone with jitter * I added,
    jitter = 1e-10 * mean diagonal, times 100 per try; `jitter` reports what was added (0 if none).
    """
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise GaussianStatsError(f"expected square matrices (..., d, d), got {tuple(cov.shape)}")
    batch_shape, d = cov.shape[:-2], cov.shape[-1]
    flat = cov.reshape(-1, d, d)
    if not torch.isfinite(flat).all():
        raise GaussianStatsError("covariance contains NaN or Inf values (non-finite training features?)")
    L = torch.empty_like(flat)
    jitter = torch.zeros(flat.shape[0], dtype=flat.dtype, device=flat.device)
    for i0 in range(0, flat.shape[0], max(1, chunk)):
        c = flat[i0 : i0 + chunk]
        out, info = torch.linalg.cholesky_ex(c)
        bad = torch.nonzero(info).flatten()
        if bad.numel():
            scale = torch.diagonal(c[bad], dim1=-2, dim2=-1).mean(-1).abs().clamp(min=1e-12)  # (k,)
            j = 1e-10 * scale
            eye = torch.eye(d, dtype=c.dtype, device=c.device)
            for _ in range(max_tries):
                out_b, info_b = torch.linalg.cholesky_ex(c[bad] + j[:, None, None] * eye)
                ok = info_b == 0
                out[bad[ok]] = out_b[ok]
                jitter[i0 + bad[ok]] = j[ok]
                bad, j = bad[~ok], j[~ok] * 100
                if not bad.numel():
                    break
            if bad.numel():
                raise GaussianStatsError(
                    f"{bad.numel()} covariance matrices are not positive definite even with jitter up to "
                    f"{float(j.max()) / 100:.3g}; increase eps (the ridge added to the covariance)"
                )
        L[i0 : i0 + chunk] = out
    n_jit = int((jitter > 0).sum())
    if n_jit:
        log.warning(
            "added jitter (max %.3g) to %d of %d covariance matrices to factorise them; consider a larger eps",
            float(jitter.max()),
            n_jit,
            flat.shape[0],
        )
    return L.reshape(*batch_shape, d, d), jitter.reshape(batch_shape)


def inverse_factor(chol: Tensor, *, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """L^-1 of lower Cholesky factors (..., d, d) by triangular solves against I (never LU).

    With W = L^-1, S^-1 = W^T W and the Mahalanobis distance is ||W (x - mu)||: one batched matmul
    per scoring call instead of one triangular solve per matrix.
    """
    batch_shape, d = chol.shape[:-2], chol.shape[-1]
    flat = chol.reshape(-1, d, d)
    eye = torch.eye(d, dtype=chol.dtype, device=chol.device)
    out = torch.empty_like(flat)
    for i0 in range(0, flat.shape[0], max(1, chunk)):
        c = flat[i0 : i0 + chunk]
        out[i0 : i0 + chunk] = torch.linalg.solve_triangular(c, eye.expand_as(c), upper=False)
    return out.reshape(*batch_shape, d, d)


def mahalanobis(x: Tensor, mean: Tensor, inv_chol: Tensor, *, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Mahalanobis distances sqrt((x - mu)^T S^-1 (x - mu)) = ||W (x - mu)|| with W = L^-1, S = L L^T.

    x (N, G, d), mean (G, d), inv_chol (G, d, d) -> (N, G); or x (N, d), mean (d,), inv_chol (d, d)
    -> (N,). Computed in inv_chol's dtype on its device, `chunk` groups at a time.
    """
    single = mean.ndim == 1
    if single:
        x, mean, inv_chol = x[:, None, :] if x.ndim == 2 else x, mean[None], inv_chol[None]
    if (
        x.ndim != 3
        or mean.ndim != 2
        or inv_chol.ndim != 3
        or x.shape[1:] != mean.shape
        or inv_chol.shape[1:] != (mean.shape[1], mean.shape[1])
        or inv_chol.shape[0] != mean.shape[0]
    ):
        raise GaussianStatsError(
            "mahalanobis expects x (N, G, d), mean (G, d), inv_chol (G, d, d) (or (N, d), (d,), (d, d)); got "
            f"x {tuple(x.shape)}, mean {tuple(mean.shape)}, inv_chol {tuple(inv_chol.shape)}"
        )
    dt, dev = inv_chol.dtype, inv_chol.device
    n, g, _ = x.shape
    out = torch.empty(n, g, dtype=dt, device=dev)
    for g0 in range(0, g, max(1, chunk)):
        g1 = min(g0 + chunk, g)
        diff = x[:, g0:g1].to(device=dev, dtype=dt) - mean[g0:g1].to(device=dev, dtype=dt)  # (N, g, d)
        z = torch.bmm(inv_chol[g0:g1], diff.permute(1, 2, 0))  # (g, d, d) @ (g, d, N) -> (g, d, N)
        out[:, g0:g1] = torch.linalg.vector_norm(z, dim=1).T
    return out[:, 0] if single else out
