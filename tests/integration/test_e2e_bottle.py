"""End to end through the CLI on real MVTec AD bottle images: fit, eval, score, and its error paths.

A seeded subset keeps it fast on 2 CPU cores: 60 train/good images (54 fitted, 6 held out for the
threshold), and a test split of 12 good + 6 of each defect type with their masks. The model is the
default config (EfficientNet-Lite0 PatchCore, 256x256, no crop, 10% coreset).

The bars are set between the real method and broken ones, measured on this subset (3 seeds for the
real method): real image AUROC 1.000, pixel AUROC 0.980-0.986, AUPRO 0.935-0.951; with randomly
initialised backbone weights 0.935 / 0.917 / 0.674; with maps shuffled between images pixel AUROC
0.727 and AUPRO 0.261.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from fixtures_dist import place

from patchaudit.scheduler import cli

TRAIN_IMAGES = 60
TEST_GOOD = 12
TEST_PER_DEFECT = 6
SEED = 0
MIN_IMAGE_AUROC = 0.98  # 216 good/defective pairs: allows ~4 misordered pairs
MIN_PIXEL_AUROC = 0.95
MIN_AUPRO = 0.85
# Scores of one image by two paths (eval vs score, single-process vs distributed) agree to float32
# rounding, which moves with batch size, thread count and the CPU's kernels: measured up to ~3e-6
# relative on bottle scores (fixtures_dist docstring). 1e-4 leaves room for other CPUs.
SCORE_RTOL = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[2]


def _sample(paths: list[Path], n: int, rng: np.random.Generator) -> list[Path]:
    paths = sorted(paths)
    return [paths[i] for i in sorted(rng.choice(len(paths), min(n, len(paths)), replace=False))]


def build_subset(category: Path, out: Path, seed: int = SEED) -> dict[str, int]:
    """Copy a seeded MVTec-style subset of `category` to `out`; returns images per test type."""
    rng = np.random.default_rng(seed)
    for src in _sample(list((category / "train" / "good").glob("*.png")), TRAIN_IMAGES, rng):
        place(src, out / "train" / "good" / src.name)
    counts = {}
    for type_dir in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
        n = TEST_GOOD if type_dir.name == "good" else TEST_PER_DEFECT
        chosen = _sample(list(type_dir.glob("*.png")), n, rng)
        for src in chosen:
            place(src, out / "test" / type_dir.name / src.name)
            mask = category / "ground_truth" / type_dir.name / f"{src.stem}_mask.png"
            if mask.is_file():
                place(mask, out / "ground_truth" / type_dir.name / mask.name)
        counts[type_dir.name] = len(chosen)
    return counts


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`patchaudit ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def subset(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("bottle_subset")
    return out, build_subset(bottle_dir, out)


@pytest.fixture(scope="module")
def fitted(subset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(model dir, the JSON `patchaudit fit` printed), fitted once for the module."""
    data, _ = subset
    model_dir = tmp_path_factory.mktemp("e2e") / "model"
    code, out, err = run_cli(["fit", "--data", str(data), "--out", str(model_dir)])
    assert code == 0, f"patchaudit fit exited {code}: {err}"
    return model_dir, json.loads(out)


def test_fit_calibrates_on_every_training_image(fitted) -> None:
    model_dir, info = fitted
    assert info["n_fit_images"] == TRAIN_IMAGES  # cross-fitting: every image fits and calibrates
    assert info["n_calibration_images"] == TRAIN_IMAGES
    cal = info["calibration"]
    assert cal["folds"] == 5 and cal["target_fpr"] == 0.01
    lo, hi = cal["estimated_fpr_ci95"]
    assert lo <= cal["estimated_fpr"] <= hi
    assert info["errors"] == []
    assert info["threshold"] > 0
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["model_id"] == info["model_id"]
    assert manifest["method"] == "patchcore"


@pytest.fixture(scope="module")
def evaluated(subset, fitted, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(eval output dir, metrics.json) from `patchaudit eval` on the subset's test split."""
    data, _ = subset
    model_dir, _ = fitted
    out_dir = tmp_path_factory.mktemp("e2e_eval")
    code, _, err = run_cli(["eval", "--data", str(data), "--model", str(model_dir), "--out", str(out_dir)])
    assert code == 0, f"patchaudit eval exited {code}: {err}"
    return out_dir, json.loads((out_dir / "metrics.json").read_text())


def test_eval_meets_quality_bar(subset, fitted, evaluated) -> None:
    _, counts = subset
    _, info = fitted
    _, m = evaluated
    assert m["n_images"] == sum(counts.values())
    assert m["n_good"] == counts["good"]
    assert set(m["per_defect"]) == set(counts) - {"good"}
    assert m["decode_errors"] == []
    # The threshold is the one calibrated at fit time on held-out good images, not tuned on the test set.
    assert m["threshold"] == pytest.approx(info["threshold"])
    assert m["image_auroc"] >= MIN_IMAGE_AUROC, m
    assert m["pixel_auroc"] >= MIN_PIXEL_AUROC, m
    assert m["pixel_images"] == sum(counts.values())  # every test image had a map and a mask
    assert m["aupro"] >= MIN_AUPRO, m


def assert_same_flags(rows: dict[str, dict], ref: dict[str, dict]) -> None:
    """Each row is flagged anomalous like its reference row, except where the score sits within
    SCORE_RTOL of the threshold: there either side of it is right (float32 rounding decides)."""
    compared = set()
    for uri, r in rows.items():
        want = ref[uri]
        assert r["is_anomalous"] == (r["score"] >= r["threshold"]), uri  # one score, one decision
        if abs(want["score"] - want["threshold"]) > SCORE_RTOL * abs(want["threshold"]):
            assert r["is_anomalous"] == want["is_anomalous"], (uri, r["score"], want["score"], want["threshold"])
            compared.add(want["is_anomalous"])
    assert compared == {True, False}, "no anomalous or no normal image clear of the threshold to compare"


def _score_by_uri(report_dir: Path) -> dict[str, dict]:
    from patchaudit.store import reports
    from patchaudit.store.objects import open_store

    store = open_store(str(report_dir))
    assert reports.is_complete(store), f"{report_dir} has no _SUCCESS marker"
    page = (report_dir / "index.html").read_text()  # every finished report has its review page
    assert "<svg" in page and "Top flagged images" in page
    rows = reports.read_report(store).to_pylist()
    by_uri = {r["image_uri"]: r for r in rows}
    assert len(by_uri) == len(rows), "an image appears in more than one row"
    return by_uri


@pytest.fixture(scope="module")
def single_report(subset, fitted, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(report dir, printed JSON) of `patchaudit score --single-process` on the subset's test images."""
    data, _ = subset
    model_dir, _ = fitted
    report_dir = tmp_path_factory.mktemp("e2e_single") / "report"
    code, out, err = run_cli(
        [
            "score",
            "--input",
            str(data / "test"),
            "--model",
            str(model_dir),
            "--report",
            str(report_dir),
            "--run-id",
            "e2e-single",
            "--single-process",
        ]
    )
    assert code == 0, f"patchaudit score --single-process exited {code}: {err}"
    return report_dir, json.loads(out)


def test_score_single_process_report_matches_eval(subset, fitted, evaluated, single_report) -> None:
    """`patchaudit score` writes one row per image, with the same scores `eval` computed."""
    import pyarrow.parquet as pq

    from patchaudit.store import reports
    from patchaudit.store.objects import open_store

    data, counts = subset
    _, info = fitted
    eval_dir, _ = evaluated
    report_dir, printed = single_report
    n = sum(counts.values())
    assert (printed["rows"], printed["scored"], printed["errors"]) == (n, n, 0)
    eval_scores = {r["key"]: r["score"] for r in pq.read_table(eval_dir / "scores.parquet").to_pylist()}

    rows = _score_by_uri(report_dir)
    assert len(rows) == n
    prefix = open_store(str(data)).uri + "/"
    assert {uri[len(prefix) :] for uri in rows} == set(eval_scores)
    for uri, r in rows.items():
        assert (r["run_id"], r["model_id"], r["error"]) == ("e2e-single", info["model_id"], None)
        assert r["score"] == pytest.approx(eval_scores[uri[len(prefix) :]], rel=SCORE_RTOL), uri
        assert r["is_anomalous"] == (r["score"] >= r["threshold"])
        assert (r["heatmap_uri"] is not None) == r["is_anomalous"]  # heatmaps: on by default, anomalous only
    summary = reports.read_summary(open_store(str(report_dir)))
    assert summary["rows"] == n and summary["run_id"] == "e2e-single"


@pytest.mark.integration
def test_score_distributed_matches_single_process(subset, fitted, single_report, tmp_path: Path) -> None:
    """The main job: `patchaudit score` (Redis Streams + local Ray) gives the single-process rows.

    Run in a child process so that its Ray instance ends with it. The run id is new every time: run
    state lives on in the shared Redis (for `patchaudit status`) after the temp report is gone.
    """
    data, counts = subset
    model_dir, _ = fitted
    report_dir = tmp_path / "report"
    run_id = f"e2e-distributed-{uuid.uuid4().hex[:8]}"
    cmd = [
        sys.executable,
        "-m",
        "patchaudit.scheduler.cli",
        "score",
        "--input",
        str(data / "test"),
        "--model",
        str(model_dir),
        "--report",
        str(report_dir),
        "--run-id",
        run_id,
        "--workers",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = sum(counts.values())
    printed = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert (printed["rows"], printed["scored"], printed["errors"]) == (n, n, 0)

    dist = _score_by_uri(report_dir)
    single = _score_by_uri(single_report[0])
    assert set(dist) == set(single)
    for uri, r in dist.items():
        assert r["run_id"] == run_id and r["error"] is None
        assert r["score"] == pytest.approx(single[uri]["score"], rel=SCORE_RTOL), uri
    assert_same_flags(dist, single)
    # Mining embeddings (on by default) are written by the workers too: one per scored image, as the
    # single-process path computes them (float16: compared to its rounding).
    from patchaudit.store.embeddings import read_embeddings
    from patchaudit.store.objects import open_store

    emb_d, emb_s = (read_embeddings(open_store(str(p))) for p in (report_dir, single_report[0]))
    assert sorted(emb_d.uris) == sorted(emb_s.uris) == sorted(dist) and emb_d.space == emb_s.space
    order_d, order_s = np.argsort(emb_d.uris), np.argsort(emb_s.uris)
    np.testing.assert_allclose(emb_d.pooled[order_d], emb_s.pooled[order_s], atol=2e-3)
    np.testing.assert_allclose(emb_d.peak[order_d], emb_s.peak[order_s], atol=2e-3)


# ------------------------------------------------------------------ error paths: one line, exit 2


def _one_error_line(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"patchaudit {argv[0]}: error: "), lines[0]
    return lines[0]


def _tiny_images(folder: Path, n: int = 3) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_error_missing_data_folder(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    line = _one_error_line(capsys, ["fit", "--data", str(missing), "--out", str(tmp_path / "m")])
    assert str(missing) in line
    assert not (tmp_path / "m").exists()


def test_error_folder_without_images(capsys, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "train" / "good").mkdir(parents=True)
    (data / "train" / "good" / "notes.txt").write_text("not an image")
    line = _one_error_line(capsys, ["fit", "--data", str(data), "--out", str(tmp_path / "m")])
    assert "no training images" in line and ".png" in line


def test_error_unknown_backbone(capsys, tmp_path: Path) -> None:
    data = _tiny_images(tmp_path / "data")
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  backbone: resnet_does_not_exist\n")
    line = _one_error_line(capsys, ["fit", "--data", str(data), "--config", str(config), "--out", str(tmp_path / "m")])
    assert "resnet_does_not_exist" in line


def test_error_unknown_config_key(capsys, tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text(
        textwrap.dedent("""\
        model:
          patchcore:
            coreset_ration: 0.1
        """)
    )
    line = _one_error_line(
        capsys, ["fit", "--data", str(tmp_path), "--config", str(config), "--out", str(tmp_path / "m")]
    )
    assert "coreset_ration" in line and "coreset_ratio" in line  # names the bad key and the allowed ones
    assert str(config) in line


def test_help_does_not_import_heavy_modules() -> None:
    probe = textwrap.dedent("""\
        import json, sys
        from patchaudit.scheduler import cli
        for argv in (["--help"], ["fit", "--help"], ["eval", "--help"], ["score", "--help"], ["status", "--help"]):
            try:
                cli.main(argv)
            except SystemExit as exc:
                if exc.code != 0:
                    raise
        heavy = [m for m in ("torch", "torchvision", "timm", "faiss", "ray") if m in sys.modules]
        print("HEAVY=" + json.dumps(heavy))
        """)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: patchaudit" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY=[]", proc.stdout[-500:]
