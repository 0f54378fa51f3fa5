"""PaDiM, Gaussian AD and the shared covariance code, checked against direct numpy computations."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch

from patchaudit.errors import ArtifactError, ConfigError
from patchaudit.workers.covariance import (
    GaussianStatsError,
    MomentSums,
    cholesky_factor,
    inverse_factor,
    ledoit_wolf,
    mahalanobis,
)
from patchaudit.workers.gaussian import GaussianFitter, GaussianStats, gaussian_scores, gaussian_stage_distances
from patchaudit.workers.padim import PadimFitter, PadimStats, padim_embedding, padim_scores, select_channels

# -- numpy references -----------------------------------------------------------------------------


def np_ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf as sklearn's `ledoit_wolf_shrinkage` computes it (unblocked)."""
    x = x - x.mean(0)
    n, p = x.shape
    emp_cov = x.T @ x / n
    x2 = x**2
    emp_cov_trace = x2.sum(0) / n
    mu = emp_cov_trace.sum() / p
    beta_ = (x2.T @ x2).sum()
    delta_ = ((x.T @ x) ** 2).sum() / n**2
    beta = 1.0 / (p * n) * (beta_ / n - delta_)
    delta = (delta_ - 2.0 * mu * emp_cov_trace.sum() + p * mu**2) / p
    beta = min(beta, delta)
    s = 0.0 if beta == 0 else beta / delta
    return (1.0 - s) * emp_cov + s * mu * np.eye(p), s


def np_mahalanobis(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """sqrt((x - mu)^T inv(S) (x - mu)) for rows x (N, d)."""
    diff = x - mu
    return np.sqrt(np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff))


def np_padim_embedding(features: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """Nearest upsampling by integer repeats, concatenation, channel subset: -> (N, d, h, w)."""
    h = features[0].shape[2]
    ups = [np.repeat(np.repeat(f, h // f.shape[2], axis=2), h // f.shape[3], axis=3) for f in features]
    return np.concatenate(ups, axis=1)[:, idx]


def random_spd(rng: np.random.Generator, g: int, d: int) -> np.ndarray:
    a = rng.normal(size=(g, d, 2 * d))
    return a @ a.transpose(0, 2, 1) / (2 * d) + 0.05 * np.eye(d)


def rank_auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(pos > neg) over all pairs."""
    return float((pos[:, None] > neg[None, :]).mean())


# -- covariance.py --------------------------------------------------------------------------------


def test_mahalanobis_matches_numpy_inverse():
    rng = np.random.default_rng(0)
    g, d, n = 5, 12, 7
    cov = random_spd(rng, g, d)
    mu = rng.normal(size=(g, d))
    x = mu + rng.normal(size=(n, g, d)) * 2.0
    chol, jitter = cholesky_factor(torch.from_numpy(cov))
    assert float(jitter.abs().max()) == 0.0
    np.testing.assert_allclose((chol @ chol.mT).numpy(), cov, rtol=1e-12, atol=1e-14)
    w = inverse_factor(chol, chunk=2)
    assert torch.equal(w, torch.tril(w))
    np.testing.assert_allclose((w @ chol).numpy(), np.broadcast_to(np.eye(d), (g, d, d)), atol=1e-12)
    want = np.stack([np_mahalanobis(x[:, i], mu[i], cov[i]) for i in range(g)], axis=1)  # (N, G)
    got64 = mahalanobis(torch.from_numpy(x), torch.from_numpy(mu), w, chunk=2)
    np.testing.assert_allclose(got64.numpy(), want, rtol=1e-10)
    got32 = mahalanobis(torch.from_numpy(x).float(), torch.from_numpy(mu).float(), w.float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-4)
    # one Gaussian, unbatched shapes
    one = mahalanobis(torch.from_numpy(x[:, 3]), torch.from_numpy(mu[3]), w[3])
    np.testing.assert_allclose(one.numpy(), want[:, 3], rtol=1e-10)


def test_mahalanobis_rejects_mismatched_shapes():
    with pytest.raises(GaussianStatsError, match="mean"):
        mahalanobis(torch.zeros(4, 3, 5), torch.zeros(3, 6), torch.eye(6).expand(3, 6, 6))


def test_ledoit_wolf_hand_derived_example():
    # X centred, n=3, p=2: S = [[8, 2], [2, 2]] / 3, mu = 5/3, sum ||x||^4 = 42
    # beta = (42/3 - 76/9) / 6 = 25/27, delta = 13/9 -> shrinkage = 25/39
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-2.0, -1.0]])
    cov, s = ledoit_wolf(x)
    assert float(s) == pytest.approx(25 / 39, rel=1e-12)
    want = np.array([[79 / 39, 28 / 117], [28 / 117, 51 / 39]])
    np.testing.assert_allclose(cov.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("n,p", [(40, 10), (6, 20), (25, 25)])
def test_ledoit_wolf_matches_numpy_formula(n, p):
    rng = np.random.default_rng(n * 100 + p)
    x = rng.normal(size=(3, n, p)) @ rng.normal(size=(p, p)) + 5.0  # correlated, offset
    cov, s = ledoit_wolf(torch.from_numpy(x))  # batched over the leading 3
    for i in range(3):
        want_cov, want_s = np_ledoit_wolf(x[i])
        assert float(s[i]) == pytest.approx(want_s, rel=1e-9)
        np.testing.assert_allclose(cov[i].numpy(), want_cov, rtol=1e-9, atol=1e-12)
    assert 0.0 < float(s.min()) and float(s.max()) <= 1.0


def test_moment_sums_streaming_equals_one_shot():
    rng = np.random.default_rng(1)
    g, d = 6, 9
    x = rng.normal(size=(50, g, d)) @ rng.normal(size=(d, d)) + 1000.0  # large mean: cancellation test
    sums = MomentSums(g, d, chunk=4)
    for a, b in [(0, 7), (7, 8), (8, 31), (31, 50)]:
        sums.update(torch.from_numpy(x[a:b]))
    assert sums.n == 50
    np.testing.assert_allclose(sums.mean().numpy(), x.mean(0), rtol=1e-12)
    cov, fourth = sums.moments()
    xc = x - x.mean(0)
    np.testing.assert_allclose(cov.numpy(), np.einsum("ngi,ngj->gij", xc, xc) / 50, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(fourth.numpy(), ((xc**2).sum(-1) ** 2).mean(0), rtol=1e-8)
    unbiased, s0 = sums.covariance(eps=0.0)
    np.testing.assert_allclose(unbiased.numpy(), np.stack([np.cov(x[:, i].T) for i in range(g)]), rtol=1e-8, atol=1e-9)
    assert float(s0.abs().max()) == 0.0
    lw, s = sums.covariance(shrinkage="ledoit_wolf", eps=0.0)
    for i in range(g):
        want_cov, want_s = np_ledoit_wolf(x[:, i])
        assert float(s[i]) == pytest.approx(want_s, rel=1e-6)
        np.testing.assert_allclose(lw[i].numpy(), want_cov, rtol=1e-7, atol=1e-9)


def rank_deficient_samples(rng: np.random.Generator, n: int = 8, d: int = 30) -> np.ndarray:
    """(n, d) with n < d, a duplicated channel block and constant channels."""
    x = rng.normal(size=(n, d))
    x[:, 10:15] = x[:, 0:5]  # duplicates
    x[:, 20:25] = 3.0  # constant
    return x


@pytest.mark.parametrize("shrinkage,eps", [(None, 0.01), ("ledoit_wolf", 1e-6)])
def test_covariance_positive_definite_for_rank_deficient_features(shrinkage, eps):
    rng = np.random.default_rng(2)
    x = np.stack([rank_deficient_samples(rng) for _ in range(4)], axis=1)  # (N=8, G=4, d=30)
    sums = MomentSums(4, 30)
    sums.update(torch.from_numpy(x))
    cov, _ = sums.covariance(shrinkage=shrinkage, eps=eps)
    assert int(torch.linalg.matrix_rank(sums.moments()[0][0])) < 30  # really rank deficient before regularising
    chol, jitter = cholesky_factor(cov)
    assert float(jitter.abs().max()) == 0.0  # the eps floor suffices, no jitter needed
    assert float(torch.linalg.eigvalsh(cov).min()) > 0
    assert torch.isfinite(chol).all() and float(torch.diagonal(chol, dim1=-2, dim2=-1).min()) > 0
    np.testing.assert_allclose((chol @ chol.mT).numpy(), cov.numpy(), rtol=1e-10, atol=1e-12)
    w = inverse_factor(chol)
    np.testing.assert_allclose((w @ cov @ w.mT).numpy(), np.broadcast_to(np.eye(30), (4, 30, 30)), atol=1e-8)


def test_ledoit_wolf_all_constant_features_rely_on_eps_floor():
    sums = MomentSums(1, 5)
    sums.update(torch.full((4, 1, 5), 2.0))
    cov, s = sums.covariance(shrinkage="ledoit_wolf", eps=1e-6)
    np.testing.assert_allclose(cov[0].numpy(), 1e-6 * np.eye(5), atol=1e-15)
    assert float(s[0]) == 0.0


def test_cholesky_jitter_retry_and_failure(caplog):
    rng = np.random.default_rng(3)
    x = rank_deficient_samples(rng)
    singular = torch.from_numpy(np.cov(x.T))[None]  # eps = 0: singular
    good = torch.from_numpy(random_spd(rng, 3, 30))
    cov = torch.cat([good[:2], singular, good[2:]])  # (4, 30, 30), the bad one inside a chunk
    with caplog.at_level(logging.WARNING, logger="patchaudit.workers.covariance"):
        chol, jitter = cholesky_factor(cov, chunk=3)
    assert float(jitter[2]) > 0 and float(jitter[[0, 1, 3]].abs().max()) == 0.0
    assert "jitter" in caplog.text
    np.testing.assert_allclose((chol[0] @ chol[0].T).numpy(), good[0].numpy(), rtol=1e-10)
    assert torch.isfinite(chol).all()
    # slightly indefinite (eigenvalue -1e-6 of a unit-scale matrix): jitter grows until it is fixed
    q, _ = torch.linalg.qr(torch.from_numpy(rng.normal(size=(6, 6))))
    indefinite = (q * torch.tensor([1.0, 1, 1, 1, 1, -1e-6], dtype=torch.float64)) @ q.T
    chol, jitter = cholesky_factor(indefinite[None])
    scale = float(torch.diagonal(indefinite).mean())
    assert 1e-6 * scale < float(jitter[0]) <= 1e-4 * scale * (1 + 1e-9)
    want = (indefinite + jitter[0] * torch.eye(6)).numpy()
    np.testing.assert_allclose((chol[0] @ chol[0].T).numpy(), want, atol=1e-12)
    with pytest.raises(GaussianStatsError, match="increase eps"):
        cholesky_factor(-torch.eye(4, dtype=torch.float64)[None])
    with pytest.raises(GaussianStatsError, match="NaN"):
        cholesky_factor(torch.full((1, 3, 3), float("nan"), dtype=torch.float64))


def test_cholesky_chunks_match_one_batch():
    cov = torch.from_numpy(random_spd(np.random.default_rng(4), 10, 16))
    a, _ = cholesky_factor(cov, chunk=3)
    b, _ = cholesky_factor(cov, chunk=100)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-12)


def test_bad_regularisation_settings_are_config_errors():
    sums = MomentSums(1, 3)
    sums.update(torch.randn(5, 1, 3))
    with pytest.raises(ConfigError, match="ledoit_wolf"):
        sums.covariance(shrinkage="oas")
    with pytest.raises(ConfigError, match=">= 0"):
        sums.covariance(eps=-1.0)


def test_non_finite_features_are_rejected():
    sums = MomentSums(2, 3)
    x = torch.randn(4, 2, 3)
    x[1, 1, 2] = float("inf")
    with pytest.raises(GaussianStatsError, match="NaN or Inf"):
        sums.update(x)


# -- padim.py -------------------------------------------------------------------------------------


def test_select_channels_seeded_sorted_and_bounded():
    a = select_channels([24, 40, 112], d=100, seed=7)
    assert a.dtype == torch.int64 and a.shape == (100,)
    assert bool((a[1:] > a[:-1]).all()) and int(a[0]) >= 0 and int(a[-1]) < 176
    assert torch.equal(a, select_channels([24, 40, 112], d=100, seed=7))
    assert not torch.equal(a, select_channels([24, 40, 112], d=100, seed=8))
    assert torch.equal(select_channels([24, 40, 112], d=176), torch.arange(176))
    with pytest.raises(ConfigError, match=r"176 channels .*24\+40\+112.*d <= 176"):
        select_channels([24, 40, 112], d=177)


def test_padim_embedding_is_nearest_upsampled_subset():
    rng = np.random.default_rng(5)
    feats = [rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 4, 4, 4)), rng.normal(size=(2, 5, 2, 2))]
    idx = np.array([0, 2, 3, 6, 7, 11])  # channels from every stage
    got = padim_embedding([torch.from_numpy(f) for f in feats], torch.from_numpy(idx))
    np.testing.assert_array_equal(got.numpy(), np_padim_embedding(feats, idx))
    # a stage none of whose channels is selected is skipped
    got2 = padim_embedding([torch.from_numpy(f) for f in feats], torch.tensor([0, 1, 2]))
    np.testing.assert_array_equal(got2.numpy(), feats[0])
    with pytest.raises(GaussianStatsError, match="strictly increasing"):
        padim_embedding([torch.from_numpy(f) for f in feats], torch.tensor([3, 1]))
    with pytest.raises(GaussianStatsError, match=r"\[0, 12\)"):
        padim_embedding([torch.from_numpy(f) for f in feats], torch.tensor([0, 12]))


def small_padim_features(rng: np.random.Generator, n: int, shift: float = 0.0) -> list[np.ndarray]:
    """Stages (4@8x8, 6@4x4, 8@2x2) with channel correlations and a position-dependent mean."""
    pos_mean = np.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    out = []
    for c, s in [(4, 8), (6, 4), (8, 2)]:
        z = rng.normal(size=(n, 2, s, s))
        mix = np.linspace(0.5, 1.5, c * 2).reshape(c, 2)
        f = np.einsum("ck,nkhw->nchw", mix, z) + 0.3 * rng.normal(size=(n, c, s, s))
        out.append(f + pos_mean[..., :: 8 // s, :: 8 // s] + shift)
    return out


@pytest.mark.parametrize("shrinkage", [None, "ledoit_wolf"])
def test_padim_streaming_fit_equals_one_shot_numpy(shrinkage):
    rng = np.random.default_rng(6)
    train = small_padim_features(rng, 12)
    idx = np.array([0, 1, 3, 4, 5, 8, 10, 12, 15, 17])  # d = 10 of 18
    fitter = PadimFitter(torch.from_numpy(idx))
    for a, b in [(0, 5), (5, 9), (9, 12)]:
        fitter.update([torch.from_numpy(f[a:b]) for f in train])
    stats = fitter.finalize(eps=0.01, shrinkage=shrinkage, dtype=torch.float64)
    assert stats.grid == (8, 8) and stats.stage_channels == (4, 6, 8) and stats.n_samples == 12

    emb = np_padim_embedding(train, idx).reshape(12, 10, 64)  # (N, d, P)
    test = small_padim_features(rng, 3)
    temb = np_padim_embedding(test, idx).reshape(3, 10, 64)
    want_scores = np.empty((3, 64))
    for p in range(64):
        samples = emb[:, :, p]
        cov = np.cov(samples.T) if shrinkage is None else np_ledoit_wolf(samples)[0]
        cov = cov + 0.01 * np.eye(10)
        np.testing.assert_allclose(stats.mean[p].numpy(), samples.mean(0), rtol=1e-10, atol=1e-12)
        w = stats.inv_chol[p].numpy()
        np.testing.assert_allclose(w @ cov @ w.T, np.eye(10), atol=1e-9)  # W^T W = cov^-1
        want_scores[:, p] = np_mahalanobis(temb[:, :, p], samples.mean(0), cov)
    got = padim_scores(stats, [torch.from_numpy(f) for f in test])
    assert got.shape == (3, 8, 8)
    np.testing.assert_allclose(got.reshape(3, 64).numpy(), want_scores, rtol=1e-8)
    # float32 statistics score the same within float32 accuracy
    got32 = padim_scores(fitter.finalize(eps=0.01, shrinkage=shrinkage), [torch.from_numpy(f).float() for f in test])
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.reshape(3, 64).numpy(), want_scores, rtol=1e-4)


def test_padim_anomalous_patches_score_higher():
    rng = np.random.default_rng(7)
    fitter = PadimFitter(select_channels([4, 6, 8], d=12, seed=0))
    for _ in range(4):
        fitter.update([torch.from_numpy(f).float() for f in small_padim_features(rng, 16)])
    stats = fitter.finalize()
    test = small_padim_features(rng, 4)
    # break the channel correlation in a 2x2 block of the finest stage of image 0 (positions 2..3)
    test[0][0, :, 2:4, 2:4] += np.array([1.5, -1.5, 1.5, -1.5])[:, None, None]
    maps = padim_scores(stats, [torch.from_numpy(f).float() for f in test])  # (4, 8, 8)
    anomalous = maps[0, 2:4, 2:4].flatten()
    normal_mask = torch.ones_like(maps, dtype=torch.bool)
    normal_mask[0, 2:4, 2:4] = False
    assert float(anomalous.min()) > float(maps[normal_mask].max())
    assert int(maps[0].argmax()) // 8 in (2, 3) and int(maps[0].argmax()) % 8 in (2, 3)


def test_padim_realistic_size_two_threads_without_lu(monkeypatch):
    """lite0-like stages of a 128x64 input (24@32x16, 40@16x8, 112@8x4), d = 176 (batched LU breaks
    at d >= 150 on this CPU with 2 threads): fit and score with 2 threads, and prove no LU is used."""

    def forbidden(*args, **kwargs):
        raise AssertionError("LU-based inverse/solve must not be used")

    for name in ("inv", "inv_ex", "solve", "solve_ex", "lu_factor", "lu_factor_ex"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    monkeypatch.setattr(torch, "inverse", forbidden)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        mix = torch.randn(176, 32, generator=gen) / 32**0.5

        def batch(n):
            z = torch.randn(n, 32, 32, 16, generator=gen)  # shared latent per position on the finest grid
            full = torch.einsum("ck,nkhw->nchw", mix, z) + 0.5 * torch.randn(n, 176, 32, 16, generator=gen)
            return [
                full[:, :24],
                torch.nn.functional.avg_pool2d(full[:, 24:64], 2),
                torch.nn.functional.avg_pool2d(full[:, 64:], 4),
            ]

        fitter = PadimFitter(select_channels([24, 40, 112], d=176))
        train = [batch(12), batch(12)]
        for b in train:
            fitter.update(b)
        stats = fitter.finalize(eps=0.01)
        assert stats.mean.shape == (512, 176) and stats.inv_chol.shape == (512, 176, 176)
        test = batch(4)
        maps = padim_scores(stats, test)
        assert maps.shape == (4, 32, 16) and torch.isfinite(maps).all()
    finally:
        torch.set_num_threads(threads)
    # spot-check a few positions against numpy (np.linalg.inv does not go through torch's MKL LU)
    emb = torch.cat([padim_embedding(b, stats.channel_idx) for b in train]).flatten(2).double().numpy()  # (24, d, P)
    temb = padim_embedding(test, stats.channel_idx).flatten(2).double().numpy()
    got = maps.flatten(1).numpy()
    for p in (0, 257, 511):
        cov = np.cov(emb[:, :, p].T) + 0.01 * np.eye(176)
        want = np_mahalanobis(temb[:, :, p], emb[:, :, p].mean(0), cov)
        np.testing.assert_allclose(got[:, p], want, rtol=2e-3)


def test_padim_stats_round_trip_through_npy():
    rng = np.random.default_rng(8)
    fitter = PadimFitter(torch.tensor([0, 2, 5, 9]))
    fitter.update([torch.from_numpy(f) for f in small_padim_features(rng, 6)])
    stats = fitter.finalize()
    arrays = stats.to_arrays()
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    reloaded = {}
    for k, a in arrays.items():  # through the .npy format the artifact store uses, no pickle
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        reloaded[k] = np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)
    back = PadimStats.from_arrays(reloaded)
    assert back.grid == stats.grid and back.stage_channels == stats.stage_channels and back.n_samples == 6
    for name in ("mean", "inv_chol", "channel_idx"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    test = [torch.from_numpy(f).float() for f in small_padim_features(rng, 2)]
    # Equal inputs, but BLAS results may depend on buffer alignment (MKL without its reproducibility mode).
    torch.testing.assert_close(padim_scores(back, test), padim_scores(stats, test), rtol=1e-6, atol=1e-6)

    with pytest.raises(ArtifactError, match="missing"):
        PadimStats.from_arrays({k: v for k, v in arrays.items() if k != "inv_chol"})
    with pytest.raises(ArtifactError, match="want"):
        PadimStats.from_arrays({**arrays, "grid": np.array([4, 8])})
    with pytest.raises(ArtifactError, match="strictly increasing"):
        PadimStats.from_arrays({**arrays, "channel_idx": np.array([0, 5, 2, 9])})
    with pytest.raises(ArtifactError, match="non-positive diagonal"):
        PadimStats.from_arrays({**arrays, "inv_chol": -arrays["inv_chol"]})


def test_padim_rejects_mismatched_features_and_tiny_fits():
    rng = np.random.default_rng(9)
    feats = small_padim_features(rng, 3)
    fitter = PadimFitter(torch.tensor([0, 1, 2]))
    fitter.update([torch.from_numpy(f[:1]) for f in feats])
    with pytest.raises(GaussianStatsError, match="at least 2"):
        fitter.finalize()
    with pytest.raises(GaussianStatsError, match="differ from the first batch"):
        fitter.update([torch.from_numpy(f[:, :, ::2, ::2]) for f in feats[:1]])
    fitter.update([torch.from_numpy(f[1:]) for f in feats])
    stats = fitter.finalize()
    with pytest.raises(GaussianStatsError, match=r"fitted on \(4, 6, 8\)"):
        padim_scores(stats, [torch.from_numpy(f) for f in feats[:2]])
    with pytest.raises(GaussianStatsError, match="fitted grid 8x8"):
        padim_scores(stats, [torch.from_numpy(np.repeat(np.repeat(f, 2, 2), 2, 3)) for f in feats])
    with pytest.raises(ConfigError, match="ledoit_wolf"):
        fitter.finalize(shrinkage="ledoit-wolf")


# -- gaussian.py ----------------------------------------------------------------------------------


def gaussian_features(rng: np.random.Generator, n: int, shift: float = 0.0) -> list[np.ndarray]:
    """Three stages (8@8x8, 16@4x4, 32@2x2) whose pooled vectors are correlated Gaussians."""
    out = []
    for c, s in [(8, 8), (16, 4), (32, 2)]:
        z = rng.normal(size=(n, 4))
        mix = np.cos(np.arange(c * 4).reshape(c, 4))
        pooled = z @ mix.T + 0.2 * rng.normal(size=(n, c)) + 1.0
        pooled += shift * np.sin(np.arange(c))  # a direction the normal data barely varies in
        out.append(pooled[:, :, None, None] + 0.1 * rng.normal(size=(n, c, s, s)))
    return out


def test_gaussian_matches_numpy_ledoit_wolf():
    rng = np.random.default_rng(10)
    train = gaussian_features(rng, 30)
    fitter = GaussianFitter()
    for a, b in [(0, 11), (11, 30)]:
        fitter.update([torch.from_numpy(f[a:b]) for f in train])
    stats = fitter.finalize(eps=1e-6, dtype=torch.float64)
    assert stats.stage_channels == (8, 16, 32) and stats.n_samples == 30
    test = gaussian_features(rng, 5, shift=0.5)
    got = gaussian_stage_distances(stats, [torch.from_numpy(f) for f in test])  # (5, 3)
    for i, (tr, te) in enumerate(zip(train, test)):
        v = tr.mean(axis=(2, 3))
        cov = np_ledoit_wolf(v)[0] + 1e-6 * np.eye(v.shape[1])
        w = stats.inv_chols[i].numpy()
        np.testing.assert_allclose(w @ cov @ w.T, np.eye(v.shape[1]), atol=1e-8)  # W^T W = cov^-1
        np.testing.assert_allclose(got[:, i].numpy(), np_mahalanobis(te.mean(axis=(2, 3)), v.mean(0), cov), rtol=1e-8)
    scores = gaussian_scores(stats, [torch.from_numpy(f) for f in test])
    np.testing.assert_allclose(scores.numpy(), got.sum(1).numpy(), rtol=1e-12)


def test_gaussian_separates_shifted_distribution():
    rng = np.random.default_rng(11)
    fitter = GaussianFitter()
    for _ in range(4):
        fitter.update([torch.from_numpy(f).float() for f in gaussian_features(rng, 16)])
    stats = fitter.finalize()
    normal = gaussian_scores(stats, [torch.from_numpy(f).float() for f in gaussian_features(rng, 40)]).numpy()
    shifted_feats = gaussian_features(rng, 40, shift=1.0)
    shifted = gaussian_scores(stats, [torch.from_numpy(f).float() for f in shifted_feats]).numpy()
    assert normal.dtype == np.float32
    assert rank_auroc(normal, shifted) > 0.97
    assert np.median(shifted) > 2 * np.median(normal)


def test_gaussian_stats_round_trip_and_checks():
    rng = np.random.default_rng(12)
    fitter = GaussianFitter()
    fitter.update([torch.from_numpy(f) for f in gaussian_features(rng, 10)])
    stats = fitter.finalize()
    arrays = stats.to_arrays()
    assert sorted(arrays) == ["inv_chol_0", "inv_chol_1", "inv_chol_2", "mean_0", "mean_1", "mean_2", "n_samples"]
    back = GaussianStats.from_arrays(arrays)
    test = [torch.from_numpy(f).float() for f in gaussian_features(rng, 3)]
    torch.testing.assert_close(gaussian_scores(back, test), gaussian_scores(stats, test), rtol=1e-6, atol=1e-6)
    assert back.n_samples == 10
    with pytest.raises(ArtifactError, match="exactly"):
        GaussianStats.from_arrays({k: v for k, v in arrays.items() if k != "inv_chol_2"})
    with pytest.raises(ArtifactError, match="stage 1"):
        GaussianStats.from_arrays({**arrays, "inv_chol_1": arrays["inv_chol_1"][:3]})
    with pytest.raises(GaussianStatsError, match=r"fitted on \(8, 16, 32\)"):
        gaussian_scores(stats, test[:2])
    with pytest.raises(GaussianStatsError, match="at least 2"):
        g = GaussianFitter()
        g.update([t[:1] for t in test])
        g.finalize()
