"""benchmarks/gpu_e2e.py and benchmarks/jpeg_draft.py: import chains fit a bare GPU host; JPEG copies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from bench_scripts import load_benchmark
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("faiss", "ray", "redis", "boto3")


def test_gpu_e2e_runs_without_faiss_ray_redis_boto3():
    """--help through the whole import chain (gpu_worker's guard, gpu_decode, png_fast), none of them loaded."""
    script = REPO / "benchmarks" / "gpu_e2e.py"
    code = (
        f"import runpy, sys; sys.path.insert(0, {str(script.parent)!r}); sys.argv = ['gpu_e2e.py', '--help']\n"
        f"try:\n    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"bad = [m for m in {FORBIDDEN!r} if sys.modules.get(m) is not None]\n"
        "assert not bad, bad\n"
        "import patchaudit.workers.gpu_decode, patchaudit.workers.png_fast\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_jpeg_copy_keeps_the_layout_and_masks(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ("train/good/a.png", "test/crack/b.png", "ground_truth/crack/b_mask.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(src / rel)
    load_benchmark("jpeg_draft.py").jpeg_copy(src, dst)
    assert (dst / "train/good/a.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert (dst / "test/crack/b.jpg").is_file()
    assert (dst / "ground_truth/crack/b_mask.png").read_bytes() == (src / "ground_truth/crack/b_mask.png").read_bytes()
