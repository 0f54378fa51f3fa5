"""Tests for workers.maps: Gaussian blur against scipy, resizing back to the original frame, stats, heatmaps."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from patchaudit.workers.maps import MapStats, blur, gaussian_kernel1d, heatmap_png, map_stats, smooth_maps, to_original


def smooth_field(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w) float32 with structure at several scales (so borders and interior both matter)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    return (np.sin(7 * yy + 3 * xx) + 0.5 * rng.random((h, w)) + 2 * xx).astype(np.float32)


# --------------------------------------------------------------------------- kernel and blur


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0])
def test_kernel(sigma):
    k = gaussian_kernel1d(sigma)
    assert k.numel() == 2 * int(4.0 * sigma + 0.5) + 1  # scipy's truncate=4.0 support
    assert abs(float(k.sum()) - 1.0) < 1e-6
    assert torch.equal(k, k.flip(0)) and int(k.argmax()) == k.numel() // 2


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_blur_keeps_constant_map(sigma):
    maps = torch.full((2, 40, 50), 3.25)
    out = blur(maps, sigma)
    assert out.shape == maps.shape
    torch.testing.assert_close(out, maps, rtol=0, atol=1e-5)  # borders included: no zero dilution
    assert abs(float(out.sum()) - float(maps.sum())) < 1e-2


@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
def test_blur_matches_scipy_mirror_everywhere(sigma):
    # torch's 'reflect' padding mirrors about the edge pixel (d c b | a b c d | c b a): scipy calls that 'mirror'.
    a = smooth_field(48, 64, seed=0)
    ours = blur(torch.from_numpy(a)[None], sigma)[0].numpy()
    ref = ndimage.gaussian_filter(a.astype(np.float64), sigma, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)


def test_blur_matches_scipy_on_a_long_map():
    # a side over 1024 px (large originals), in case blur switches implementation with the map size
    a = smooth_field(24, 1100, seed=5)
    ours = blur(torch.from_numpy(a)[None], 4.0)[0].numpy()
    ref = ndimage.gaussian_filter(a.astype(np.float64), 4.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)


def test_blur_vs_scipy_reflect_differs_only_at_borders():
    # scipy's 'reflect' repeats the edge pixel (b a | a b c d | d c): equal in the interior, not at borders.
    sigma = 2.0
    r = int(4 * sigma + 0.5)
    a = smooth_field(48, 64, seed=1)
    ours = blur(torch.from_numpy(a)[None], sigma)[0].numpy()
    ref = ndimage.gaussian_filter(a.astype(np.float64), sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(ours[r:-r, r:-r], ref[r:-r, r:-r], rtol=0, atol=2e-5)
    assert np.abs(ours - ref)[:, :2].max() > 1e-3  # the first columns see the padding


def test_blur_batch_independent():
    a = torch.from_numpy(np.stack([smooth_field(32, 32, 2), smooth_field(32, 32, 3)]))
    out = blur(a, 2.0)
    torch.testing.assert_close(out[1], blur(a[1:], 2.0)[0])


def test_blur_zero_sigma_is_identity():
    a = torch.rand(1, 20, 20)
    assert torch.equal(blur(a, 0.0), a)


def test_blur_spreads_a_peak_with_the_right_width():
    a = torch.zeros(1, 61, 61)
    a[0, 30, 30] = 1.0
    out = blur(a, 3.0)[0]
    assert abs(float(out.sum()) - 1.0) < 1e-5  # the impulse is far from the borders: mass conserved
    assert int(out.argmax()) == 30 * 61 + 30
    row = out[30].double()
    var = float(((torch.arange(61) - 30.0) ** 2 * row).sum() / row.sum())
    assert abs(var - 9.0) < 0.05  # 1-D marginal of a separable Gaussian: variance sigma^2


# --------------------------------------------------------------------------- smooth_maps / to_original


def test_smooth_maps_shape_and_constant():
    grid = torch.full((3, 8, 10), 2.0)
    out = smooth_maps(grid, (64, 80), sigma=4.0)
    assert out.shape == (3, 64, 80) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((3, 64, 80), 2.0))


def test_smooth_maps_peak_position():
    grid = torch.zeros(1, 8, 8, dtype=torch.float64)
    grid[0, 2, 5] = 1.0  # patch (y=2, x=5) covers input pixels y 16..23, x 40..47 at 8x upsampling
    out = smooth_maps(grid, (64, 64), sigma=4.0)[0]
    py, px = divmod(int(out.argmax()), 64)
    assert 16 <= py <= 23 and 40 <= px <= 47


def test_smooth_maps_pixel_centres():
    # Half-pixel convention (align_corners=False): patch i covers input pixels i*s .. (i+1)*s - 1, its value
    # sits at their centre, and the outer half-patches are flat.
    grid = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # (1, 2, 2)
    row = smooth_maps(grid, (8, 8), sigma=0.0)[0, 3]
    torch.testing.assert_close(row, torch.tensor([0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1]))


def test_to_original_no_crop():
    smap = torch.from_numpy(smooth_field(32, 32, 4))
    out = to_original(smap, (120, 90), (32, 32), None)
    assert out.shape == (120, 90) and out.dtype == np.float32
    lo, hi = float(smap.min()), float(smap.max())
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5  # bilinear never overshoots
    same = to_original(smap, (32, 32), (32, 32), None)
    np.testing.assert_allclose(same, smap.numpy(), atol=1e-6)


def test_to_original_with_crop_outside_gets_min():
    # original 200x300, resized to 100x100, centre crop 50x60 -> crop box in the original:
    # rows (25..75)*2 = 50..150, cols (20..80)*3 = 60..240
    smap = torch.full((50, 60), 5.0)
    smap[20:30, 25:35] = 1.0  # the minimum, inside the crop
    out = to_original(smap, (200, 300), (100, 100), (50, 60))
    assert out.shape == (200, 300) and out.dtype == np.float32
    outside = np.ones((200, 300), dtype=bool)
    outside[50:150, 60:240] = False
    assert np.all(out[outside] == 1.0)
    inner = out[50:150, 60:240]
    assert inner.max() == pytest.approx(5.0) and inner.min() >= 1.0 - 1e-6
    # the box edges are where they should be: first/last rows and columns of it are near 5
    for edge in (inner[0], inner[-1], inner[:, 0], inner[:, -1]):
        assert edge.min() > 4.9


# --------------------------------------------------------------------------- stats


def test_map_stats_hand_made():
    amap = np.zeros((10, 20), dtype=np.float32)
    amap[6:9, 1:5] = 1.0  # 12 pixels at the threshold (>= counts)
    amap[3, 17] = 5.0  # the peak: x=17, y=3
    amap[0, 0] = 0.999  # just below the threshold
    s = map_stats(amap, threshold=1.0)
    assert isinstance(s, MapStats)
    assert (s.peak_x, s.peak_y) == (17, 3)
    assert s.map_max == pytest.approx(5.0)
    assert s.map_mean == pytest.approx((12 + 5 + 0.999) / 200)
    assert s.anomalous_area_fraction == pytest.approx(13 / 200)
    assert map_stats(amap, threshold=6.0).anomalous_area_fraction == 0.0
    assert map_stats(amap, threshold=-1.0).anomalous_area_fraction == 1.0


def test_map_stats_non_square_peak():
    amap = np.zeros((7, 3), dtype=np.float32)
    amap[5, 2] = 1.0
    s = map_stats(amap, 0.5)
    assert (s.peak_x, s.peak_y) == (2, 5)


# --------------------------------------------------------------------------- heatmaps


def load_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.load()
    return img


def test_heatmap_png_size_limited():
    amap = np.random.default_rng(0).random((100, 300)).astype(np.float32)
    img = load_png(heatmap_png(amap, 0.0, 1.0, max_side=64))
    assert img.size == (64, 21)  # (width, height): aspect kept, longest side max_side
    img = load_png(heatmap_png(amap, 0.0, 1.0, max_side=512))
    assert img.size == (300, 100)  # never upscaled
    assert img.mode == "RGB"


def test_heatmap_png_fixed_scale_colours():
    amap = np.array([[-1.0, 0.0, 2.0, 9.0]], dtype=np.float32)  # below, at vmin, at vmax, above
    px = np.asarray(load_png(heatmap_png(amap, 0.0, 2.0)))
    assert px.shape == (1, 4, 3)
    np.testing.assert_array_equal(px[0, 0], px[0, 1])  # clipped to vmin's colour
    np.testing.assert_array_equal(px[0, 2], px[0, 3])  # clipped to vmax's colour
    np.testing.assert_array_equal(px[0, 1], [0, 0, 80])  # the ramp's ends
    np.testing.assert_array_equal(px[0, 2], [220, 20, 20])


def test_heatmap_png_blend_over_image():
    amap = np.zeros((40, 60), dtype=np.float32)
    image = np.full((80, 120, 3), 200, dtype=np.uint8)  # a different size than the map: resized to it
    img = load_png(heatmap_png(amap, 0.0, 1.0, image=image, alpha=0.5))
    assert img.size == (60, 40)
    np.testing.assert_allclose(np.asarray(img)[10, 10].astype(int), [100, 100, 140], atol=1)  # (200 + (0,0,80)) / 2


def test_map_stats_batch_equals_map_stats():
    """The worker's device-side statistics agree with the numpy reference, ties and thresholds included."""
    from patchaudit.workers.maps import MapStatsCollector, map_stats, map_stats_batch

    rng = np.random.default_rng(3)
    maps = [
        torch.from_numpy(rng.random((20, 30), dtype=np.float32)),
        torch.zeros(7, 5),
        torch.from_numpy(rng.random((1, 9), dtype=np.float32)),
    ]
    maps[1][2, 3] = maps[1][4, 1] = 2.0  # two equal peaks: the first in row-major order wins
    collector = MapStatsCollector(0.7)
    for m in maps:
        collector._device_add(m)  # the GPU path's reductions, run here on CPU tensors
    got = collector.result()
    collector.add(maps[0])  # a CPU map after device ones: refused, not silently misordered
    with pytest.raises(ValueError, match="mixed"):
        collector.result()
    assert map_stats_batch([], 0.7) == []
    assert map_stats_batch(maps, 0.7) == [map_stats(m.numpy(), 0.7) for m in maps]  # CPU maps: numpy itself
    for m, s in zip(maps, got):
        ref = map_stats(m.numpy(), 0.7)
        assert (s.peak_x, s.peak_y, s.map_max, s.anomalous_area_fraction) == (
            ref.peak_x,
            ref.peak_y,
            ref.map_max,
            ref.anomalous_area_fraction,
        )
        assert s.map_mean == pytest.approx(ref.map_mean, rel=1e-6)
    assert (got[1].peak_y, got[1].peak_x) == (2, 3)


def test_to_original_tensor_stays_on_its_device_and_equals_to_original():
    from patchaudit.workers.maps import to_original, to_original_tensor

    smap = torch.rand(16, 16)
    for crop in (None, (8, 8)):
        t = to_original_tensor(smap, (40, 30), (16, 16), crop)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (40, 30)
        np.testing.assert_array_equal(t.numpy(), to_original(smap, (40, 30), (16, 16), crop))
