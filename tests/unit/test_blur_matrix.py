"""The matrix form of the map blur (workers.maps.blur_matrix) against scipy and the convolution path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from patchaudit.workers import maps


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64])
def test_blur_matrix_is_scipy_mirror_even_for_kernels_wider_than_the_signal(n):
    a = np.random.default_rng(n).random(n)
    ref = ndimage.gaussian_filter1d(a, 4.0, mode="mirror", truncate=4.0)  # radius 16: reflected repeatedly for n < 17
    ours = (maps.blur_matrix(n, 4.0).double() @ torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_blur_matrix_rows_sum_to_one():
    m = maps.blur_matrix(40, 2.5)
    assert m.shape == (40, 40) and m.dtype == torch.float32
    torch.testing.assert_close(m.sum(1), torch.ones(40))


def test_matmul_path_equals_convolution_path(monkeypatch):
    x = torch.rand(3, 256, 192, generator=torch.Generator().manual_seed(0))
    fast = maps.blur(x, 4.0)
    monkeypatch.setattr(maps, "_MATMUL_MAX_SIDE", 0)  # force the conv2d path
    slow = maps.blur(x, 4.0)
    assert fast.shape == slow.shape == (3, 256, 192)
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-6)


def test_convolution_path_still_matches_scipy(monkeypatch):
    monkeypatch.setattr(maps, "_MATMUL_MAX_SIDE", 16)  # 40x50 maps now take the conv path
    a = np.random.default_rng(1).random((40, 50)).astype(np.float32)
    ours = maps.blur(torch.from_numpy(a)[None], 2.0)[0].numpy()
    ref = ndimage.gaussian_filter(a.astype(np.float64), 2.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)


def test_blur_matrix_cache_is_not_mutated_by_blur():
    before = maps.blur_matrix(32, 1.5).clone()
    maps.blur(torch.rand(2, 32, 32), 1.5)
    assert torch.equal(maps.blur_matrix(32, 1.5), before)
