"""Anomaly maps: patch-grid scores to smoothed, full-resolution maps, their statistics and heatmap PNGs.

Following PatchCore/anomalib, the patch-grid map is upsampled to the backbone input size and blurred
there with a Gaussian (sigma 4 input pixels); it is then resized to the stored image's own size, so
maps, masks and report coordinates are in original pixels. With a center crop, the region outside the
crop was never seen: it gets the map's minimum, and the report says the crop was on.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)  # same support as anomalib/kornia: 2*int(4*sigma+0.5)+1 taps
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


# Up to this side the blur is two small matrix products (BLAS); beyond it the separable convolution.
# On CPU a 1-channel conv with a 33-tap kernel is ~4x slower than the matmul at 256 px (im2col copies
# every pixel 33 times); the matmul costs O(side) per pixel, so very large maps keep the convolution.
_MATMUL_MAX_SIDE = 1024


@functools.lru_cache(maxsize=16)
def blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n, n) float32 M with M @ x = the 1-D Gaussian blur of x (length n) under reflect padding.

    Reflect as torch/numpy 'reflect' (scipy 'mirror': d c b | a b c d | c b a), repeated for
    kernels wider than the signal. Cached: treat the result as read-only.
    """
    k = gaussian_kernel1d(sigma).double()
    r = k.numel() // 2
    src = torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None, :]  # (n, 2r+1) tap positions
    if n == 1:
        src = torch.zeros_like(src)
    else:
        period = 2 * (n - 1)
        src = src.remainder(period)
        src = torch.where(src >= n, period - src, src)
    m = torch.zeros(n, n, dtype=torch.float64).scatter_add_(1, src, k.expand(n, -1).contiguous())
    return m.float()


def blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding: (B, H, W) -> (B, H, W)."""
    if sigma <= 0:
        return maps
    _, h, w = maps.shape
    if max(h, w) <= _MATMUL_MAX_SIDE:
        mh = blur_matrix(h, float(sigma)).to(maps.device, maps.dtype)  # (H, H)
        mw = blur_matrix(w, float(sigma)).to(maps.device, maps.dtype)  # (W, W)
        return torch.matmul(torch.matmul(mh, maps), mw.T)  # columns, then rows
    k = gaussian_kernel1d(sigma).to(maps.device, maps.dtype)
    r = k.numel() // 2
    x = maps.unsqueeze(1)  # (B, 1, H, W)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def smooth_maps(grid_scores: torch.Tensor, input_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, h, w) patch-grid scores -> (B, H_in, W_in) upsampled (bilinear) and blurred maps."""
    x = F.interpolate(grid_scores.unsqueeze(1).float(), size=input_size, mode="bilinear", align_corners=False)
    return blur(x.squeeze(1), sigma)


def to_original_tensor(
    smap: torch.Tensor, original_size: tuple[int, int], resized_size: tuple[int, int], crop: tuple[int, int] | None
) -> torch.Tensor:
    """One smoothed map (H_in, W_in) -> float32 (H, W) in the stored image's pixels, on smap's device."""
    h, w = original_size
    if crop is None:
        return F.interpolate(smap[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    # The crop covers the centre of the resized image; map it back onto the original frame.
    rh, rw = resized_size
    ch, cw = crop
    top, left = (rh - ch) // 2, (rw - cw) // 2
    sy, sx = h / rh, w / rw
    y0, x0 = int(round(top * sy)), int(round(left * sx))
    y1, x1 = max(y0 + 1, int(round((top + ch) * sy))), max(x0 + 1, int(round((left + cw) * sx)))
    inner = F.interpolate(smap[None, None].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
    out = torch.full((h, w), float(smap.min()), dtype=torch.float32, device=smap.device)
    out[y0:y1, x0:x1] = inner[0, 0]
    return out


def to_original(
    smap: torch.Tensor, original_size: tuple[int, int], resized_size: tuple[int, int], crop: tuple[int, int] | None
) -> np.ndarray:
    """One smoothed map (H_in, W_in) -> float32 (H, W) numpy array in the stored image's pixels."""
    return to_original_tensor(smap, original_size, resized_size, crop).cpu().numpy()


@dataclass(frozen=True)
class MapStats:
    map_max: float
    map_mean: float
    anomalous_area_fraction: float  # share of pixels whose map value >= threshold
    peak_x: int
    peak_y: int


class MapStatsCollector:
    """`map_stats` of maps given one at a time, none of them kept: on the CPU numpy's `map_stats` at once
    (zero-copy); on a GPU, reductions there and one small copy back in `result()`, so the full-resolution
    maps never cross to the host for this. The device path accumulates the mean in float64 and takes the
    first maximum in row-major order as the peak, as `map_stats` does.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._host: list[MapStats] = []
        self._rows: list[torch.Tensor] = []  # (4,) float64 on the device: max, mean, count >= threshold, peak
        self._widths: list[int] = []
        self._sizes: list[int] = []

    def add(self, m: torch.Tensor) -> None:
        if m.device.type == "cpu":
            self._host.append(map_stats(m.numpy(), self.threshold))
            return
        self._device_add(m)

    def _device_add(self, m: torch.Tensor) -> None:  # any device: the unit tests run it on CPU tensors
        flat = m.reshape(-1)
        peak = torch.argmax(flat)  # the first maximal value, like np.argmax
        self._rows.append(
            torch.stack(
                [
                    flat[peak].double(),
                    flat.sum(dtype=torch.float64) / flat.numel(),
                    (flat >= self.threshold).sum().double(),
                    peak.double(),
                ]
            )
        )
        self._widths.append(int(m.shape[1]))
        self._sizes.append(int(m.numel()))

    def result(self) -> list[MapStats]:
        """The statistics in the order the maps were added (all on the CPU or all on one device)."""
        if self._host and self._rows:
            raise ValueError("maps from the CPU and a device were mixed in one MapStatsCollector")
        if not self._rows:
            return list(self._host)
        host = torch.stack(self._rows).cpu().numpy()  # (B, 4) float64: exact for counts and indices < 2**53
        out = []
        for (mx, mean, count, peak), width, size in zip(host, self._widths, self._sizes):
            py, px = divmod(int(peak), width)
            out.append(
                MapStats(
                    map_max=float(mx),
                    map_mean=float(mean),
                    anomalous_area_fraction=float(count) / size,
                    peak_x=px,
                    peak_y=py,
                )
            )
        return out


def map_stats_batch(maps: Sequence[torch.Tensor], threshold: float) -> list[MapStats]:
    """`map_stats` of maps on their device (see `MapStatsCollector`)."""
    collector = MapStatsCollector(threshold)
    for m in maps:
        collector.add(m)
    return collector.result()


def map_stats(amap: np.ndarray, threshold: float) -> MapStats:
    flat_peak = int(np.argmax(amap))
    py, px = divmod(flat_peak, amap.shape[1])
    return MapStats(
        map_max=float(amap.flat[flat_peak]),
        map_mean=float(amap.mean()),
        anomalous_area_fraction=float(np.count_nonzero(amap >= threshold)) / amap.size,
        peak_x=int(px),
        peak_y=int(py),
    )


def _colormap_lut() -> np.ndarray:
    """(256, 3) uint8: a perceptually ordered dark-blue -> cyan -> yellow -> red ramp (no matplotlib)."""
    stops = np.array(
        [[0.0, 0, 0, 80], [0.25, 30, 60, 200], [0.5, 40, 200, 180], [0.75, 250, 220, 40], [1.0, 220, 20, 20]],
        dtype=np.float32,
    )
    v = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(v, stops[:, 0], stops[:, c + 1]) for c in range(3)], axis=1).astype(np.uint8)


_LUT = _colormap_lut()


def heatmap_png(
    amap: np.ndarray, vmin: float, vmax: float, image: np.ndarray | None = None, alpha: float = 0.5, max_side: int = 512
) -> bytes:
    """PNG bytes of the map coloured on a fixed [vmin, vmax] scale, optionally blended over the RGB image.

    A fixed scale (e.g. [calibration median, 2 x threshold]) keeps heatmaps comparable across images.
    The map is downscaled to at most `max_side` pixels before colouring: heatmaps are for looking at.
    """
    h, w = amap.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL (width, height)
    as_image = Image.fromarray(np.asarray(amap, dtype=np.float32), mode="F")
    small = np.asarray(as_image.resize(size, Image.Resampling.BILINEAR))
    span = max(vmax - vmin, 1e-12)
    levels = np.clip((small - vmin) * (255.0 / span), 0, 255).astype(np.uint8)
    img = Image.fromarray(_LUT[levels])  # (h', w', 3)
    if image is not None:
        base = Image.fromarray(image).convert("RGB").resize(size, Image.Resampling.BILINEAR)
        img = Image.blend(base, img, alpha)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
