"""workers.gpu_decode: batched JPEG decode with a per-image CPU fallback (run on CPU), and the GPU path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from patchaudit.workers import gpu_decode
from patchaudit.workers.decode import DecodedImage, DecodeError, Preprocess, decode_image

PREP = Preprocess(image_size=(48, 64))


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    off = np.random.default_rng(seed).integers(0, 60)
    return np.stack([(x * 200 // w + off) % 256, y * 200 // h, (x + y) * 120 // (w + h)], 2).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


def cpu_reference(data: bytes, prep: Preprocess = PREP) -> np.ndarray:
    return decode_image(data, prep).pixels


def test_batch_on_the_cpu_decoder_matches_pillow_closely():
    datas = [encode(smooth(120, 160, s)) for s in range(3)]
    out = gpu_decode.decode_batch(datas, PREP, device="cpu")  # torchvision's CPU libjpeg, same code path
    for data, res in zip(datas, out):
        assert isinstance(res, DecodedImage) and res.original_size == (120, 160)
        assert res.pixels.shape == (48, 64, 3) and res.pixels.dtype == np.uint8
        diff = np.abs(res.pixels.astype(int) - cpu_reference(data).astype(int))
        assert diff.mean() < 1.5 and diff.max() <= 12  # torch's antialiased bilinear vs Pillow's


def test_everything_else_goes_to_the_cpu_in_order():
    rot = Image.Exif()
    rot[0x0112] = 6
    datas = [
        encode(smooth(40, 50)),  # 0 JPEG: batched decoder
        encode(smooth(40, 50), "PNG"),  # 1 PNG: CPU
        b"",  # 2 empty: CPU error
        encode(smooth(200, 300))[:3000],  # 3 truncated JPEG: decoder fails -> CPU error
        encode(smooth(40, 60), exif=rot.tobytes()),  # 4 rotated JPEG: CPU (rotation applied there)
        b"\xff\xd8\xff" + b"junk" * 10,  # 5 JPEG magic, no JPEG: CPU error
    ]
    seen: list[int] = []

    def fake_gpu(tensors, device):
        seen.append(len(tensors))
        return gpu_decode._nvjpeg(tensors, torch.device("cpu"))

    out = gpu_decode.decode_batch(datas, PREP, device="cpu", gpu_decode=fake_gpu)
    assert seen == [2]  # only 0 and 3 looked like plain JPEGs to send
    assert isinstance(out[0], DecodedImage)
    np.testing.assert_array_equal(out[1].pixels, cpu_reference(datas[1]))
    assert "empty" in out[2]
    with pytest.raises(DecodeError) as exc:
        decode_image(datas[3], PREP)
    assert out[3] == str(exc.value)  # the CPU path's own message
    assert out[4].original_size == (60, 40)  # rotated by the CPU path
    assert isinstance(out[5], str) and out[5]


def test_a_failing_gpu_decoder_falls_back_per_image():
    datas = [encode(smooth(40, 50, s)) for s in range(3)]

    def broken(tensors, device):
        raise RuntimeError("nvjpeg: out of memory")

    out = gpu_decode.decode_batch(datas, PREP, device="cpu", gpu_decode=broken)
    for data, res in zip(datas, out):
        np.testing.assert_array_equal(res.pixels, cpu_reference(data))  # exactly the CPU decode

    def one_bad(tensors, device):
        return [None] + gpu_decode._nvjpeg(tensors[1:], torch.device("cpu"))

    out = gpu_decode.decode_batch(datas, PREP, device="cpu", gpu_decode=one_bad)
    np.testing.assert_array_equal(out[0].pixels, cpu_reference(datas[0]))
    assert all(isinstance(r, DecodedImage) for r in out)


def test_center_crop_and_gray():
    prep = Preprocess(image_size=(64, 64), center_crop=(32, 40))
    gray = smooth(100, 100)[:, :, 0]
    (res,) = gpu_decode.decode_batch([encode(gray)], prep, device="cpu")
    assert res.pixels.shape == (32, 40, 3)
    assert (res.pixels[..., 0] == res.pixels[..., 2]).all()


def test_pipeline_uses_the_batched_decoder_and_keeps_errors(monkeypatch):
    from patchaudit.workers import pipeline

    store = {"a.jpg": encode(smooth(60, 80)), "b.png": encode(smooth(60, 80), "PNG"), "c.jpg": b"not a jpeg"}

    def read(key):
        if key not in store:
            from patchaudit.errors import PatchauditError

            raise PatchauditError(f"no object {key}")
        return store[key]

    keys = ["a.jpg", "missing.jpg", "b.png", "c.jpg"]
    monkeypatch.setattr(gpu_decode, "_nvjpeg", lambda t, d: gpu_decode.__dict__["_nvjpeg_cpu"](t))
    gpu_decode.__dict__["_nvjpeg_cpu"] = lambda t: [
        __import__("torchvision").io.decode_jpeg(x, mode=__import__("torchvision").io.ImageReadMode.RGB) for x in t
    ]
    batches = list(pipeline.decode_batches_gpu(read, keys, PREP, 3, torch.device("cpu"), threads=2))
    assert [len(b) for b in batches] == [3, 1]
    flat = [d for b in batches for d in b]
    assert [d.key for d in flat] == keys
    assert flat[0].image is not None and flat[2].image is not None
    assert "read failed" in flat[1].error and flat[3].error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_on_the_gpu():
    datas = [encode(smooth(300, 400, s)) for s in range(8)] + [b"\xff\xd8\xff broken"]
    calls = []

    def counting(tensors, device):
        calls.append(len(tensors))
        return gpu_decode._nvjpeg(tensors, device)

    out = gpu_decode.decode_batch(datas, Preprocess(image_size=(256, 256)), device="cuda", gpu_decode=counting)
    assert calls == [8]
    for data, res in zip(datas[:8], out[:8]):
        assert isinstance(res, DecodedImage) and res.original_size == (300, 400)
        diff = np.abs(res.pixels.astype(int) - cpu_reference(data, Preprocess(image_size=(256, 256))).astype(int))
        assert diff.mean() < 2.0
    assert isinstance(out[8], str)
