"""benchmarks/gpu_worker.py: its import chain stays free of faiss/ray/redis/boto3, and its compute helpers
(half-precision k-NN with exact re-rank, batched maps, device statistics) agree with the worker's code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_scripts import load_benchmark
from knn_check import assert_knn_equivalent

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_worker.py"
FORBIDDEN = ("faiss", "ray", "redis", "boto3")


@pytest.fixture(scope="module")
def bench():
    """The script as a module; the import guard it installs is removed again for the other tests."""
    before = {name: sys.modules.get(name, "absent") for name in FORBIDDEN}
    try:
        mod = load_benchmark("gpu_worker.py")
    finally:
        for name, was in before.items():
            if was == "absent" and sys.modules.get(name, "absent") is None:
                del sys.modules[name]
    return mod


def test_script_imports_without_faiss_ray_redis_boto3():
    """The GPU host has none of them: the script's own guard makes any import of them fail."""
    code = (
        "import runpy, sys; sys.argv = ['gpu_worker.py', '--help']\n"
        f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"bad = [m for m in {FORBIDDEN!r} if sys.modules.get(m) is not None]\n"
        "assert not bad, bad\n"
        "import patchaudit.workers.backbones, patchaudit.workers.decode, patchaudit.workers.features\n"
        "import patchaudit.workers.knn, patchaudit.workers.maps\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_guard_blocks_forbidden_modules():
    code = f"import runpy; runpy.run_path({str(SCRIPT)!r}); import faiss"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode != 0 and "faiss" in proc.stderr


def clustered(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, d, generator=g) * 3 + 5.0  # a large shared mean, as post-ReLU features have
    return centres[torch.randint(0, 10, (n,), generator=g)] + torch.randn(n, d, generator=g) * 0.5


def test_knn_fp32_mode_is_the_torch_shard(bench):
    bank, q = clustered(500, 16, 0), clustered(64, 16, 1)
    d, i = bench.KnnSearch(bank, "fp32").search(q)
    ref = torch.cdist(q.double(), bank.double()) ** 2  # (64, 500)
    # The nearest id, or another at the same distance (which of two ties wins depends on the CPU's GEMM).
    assert_knn_equivalent(
        (ref.min(1).values[:, None].numpy(), ref.argmin(1)[:, None].numpy()),
        (d.double()[:, None].numpy(), i[:, None].numpy()),
        all_d=ref.numpy(),
        rtol=0.0,
        atol=1e-3,
    )


@pytest.mark.parametrize("center", [True, False])
def test_half_knn_with_refine_matches_fp32(bench, center):
    bank, q = clustered(800, 32, 2), clustered(128, 32, 3)
    d32, i32 = bench.KnnSearch(bank, "fp32").search(q)
    d, i = bench.KnnSearch(bank, "bf16", refine=8, center=center).search(q)
    assert (i == i32).float().mean() > 0.99
    assert torch.allclose(d, d32, rtol=1e-4, atol=1e-3)


def test_half_knn_without_refine_is_only_approximate(bench):
    bank, q = clustered(800, 32, 2), clustered(128, 32, 3)
    d32, _ = bench.KnnSearch(bank, "fp32").search(q)
    d, _ = bench.KnnSearch(bank, "bf16", refine=0, center=False).search(q)
    assert (d - d32).abs().max() > 1e-3  # bf16 rounding of ||b||^2 - 2 q.b is visible: refine is needed


def test_to_original_batch_equals_worker_to_original(bench):
    from patchaudit.workers.maps import to_original

    smaps = torch.rand(3, 32, 32)
    sizes = torch.tensor([[50, 70], [40, 40], [50, 70]])
    got = bench.to_original_batch(smaps, sizes)
    for j in range(3):
        want = to_original(smaps[j], tuple(sizes[j].tolist()), (32, 32), None)
        np.testing.assert_allclose(got[j].numpy(), want, rtol=0, atol=1e-6)


def test_list_images_repeats_and_caps(bench, tmp_path):
    for n in ("a.png", "b.PNG", "c.txt"):
        (tmp_path / n).write_bytes(b"x")
    paths = bench.list_images(tmp_path, repeat=3, max_images=5)
    assert [p.name for p in paths] == ["a.png", "b.PNG", "a.png", "b.PNG", "a.png"]
    with pytest.raises(SystemExit, match="no images"):
        bench.list_images(tmp_path / "c.txt", 1, None)


def write_pngs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_decoder_rates_measure_each_and_report_failures(bench, tmp_path):
    """Each alternative decoder is timed over the whole list; one that cannot run is a row with the reason."""
    paths = write_pngs(tmp_path, 3)
    args = bench.parse_args(
        [
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--decode-workers",
            "0",
            "--decoders",
            "pil-full",
            "tv",
            "nope",
            "nvjpeg",
        ]
    )
    rows = {r["decoder"]: r for r in bench.decoder_rates(paths * 2, args)}
    assert set(rows) == {"pil-full", "tv", "nope"}  # nvjpeg is measured apart, on a GPU only
    assert rows["pil-full"]["images"] == rows["tv"]["images"] == 6
    assert "unknown decoder" in rows["nope"]["error"]
    assert bench.RawDecode(paths, "pil-full", (8, 8))[0].shape == (40, 60, 3)
    assert bench.RawDecode(paths, "tv", (8, 12))[0].shape == (3, 8, 12)


def test_nvjpeg_rate_runs_on_cpu_too(bench, tmp_path):
    paths = write_pngs(tmp_path, 2)
    args = bench.parse_args(["--device", "cpu", "--batch-size", "2"])
    row = bench.nvjpeg_rate(paths * 3, args, torch.device("cpu"))
    assert row["images"] == 6 and row["images_per_s"] > 0 and row["jpeg_mean_bytes"] > 0


def test_cpu_run_writes_json_and_no_false_steady_rate(tmp_path):
    """A whole run on CPU; a run shorter than the pool's read-ahead reports no steady rate (it would be the
    rate of consuming already decoded batches)."""
    out = tmp_path / "r" / "gpu.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--synthetic",
            "4",
            "--batch-size",
            "2",
            "--bank-size",
            "200",
            "--models",
            "tf_efficientnet_lite0",
            "--decode-workers",
            "1",
            "--decoders",
            "pil-full",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    result = json.loads(out.read_text())
    assert result["decoders"][0]["decoder"] == "pil-full"
    e2e = result["models"][0]["end_to_end"]
    assert e2e and all(e["steady_images_per_s"] is None and e["read_ahead_images"] == 8 for e in e2e)
    assert "run too short for a steady rate" in proc.stderr
