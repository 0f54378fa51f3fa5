"""Mining on a real scored report: bottle test images scored by a real PatchCore model (small_model),
then `similar` (archived image and new file), `cluster`, `export` and `diff` through the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from patchaudit.scheduler.cli import main

PER_TYPE = 4  # test images per folder: 4 good + 4 of each of the 3 defect types


@pytest.fixture(scope="module")
def scored(small_model, tmp_path_factory):
    """(report dir, input dir): a single-process report with embeddings (the default) of 16 bottle test images."""
    data = tmp_path_factory.mktemp("mining_data")
    for folder in sorted((small_model.data_dir / "test").iterdir()):
        for src in sorted(folder.glob("*.png"))[:PER_TYPE]:
            (data / folder.name).mkdir(exist_ok=True)
            shutil.copy(src, data / folder.name / src.name)
    report = tmp_path_factory.mktemp("mining_report") / "r"
    assert (
        main(
            [
                "score",
                "--single-process",
                "--input",
                str(data),
                "--model",
                small_model.uri,
                "--report",
                str(report),
                "--run-id",
                "mining-int",
            ]
        )
        == 0
    )
    return report, data


def test_every_scored_image_has_an_embedding(scored):
    from patchaudit.store import reports
    from patchaudit.store.embeddings import read_embeddings
    from patchaudit.store.objects import open_store

    report, _ = scored
    store = open_store(str(report))
    rows = reports.read_report(store)
    emb = read_embeddings(store)
    assert sorted(emb.uris) == sorted(rows["image_uri"].to_pylist()) and len(emb) == 16
    assert emb.pooled.dtype == np.float16 and emb.peak.shape == emb.pooled.shape
    np.testing.assert_allclose(np.linalg.norm(emb.peak.astype(np.float32), axis=1), 1.0, atol=3e-3)
    assert emb.space.startswith("patchcore-tf_efficientnet_lite0-")


def test_similar_archived_and_new_file(scored, small_model, capsys):
    report, data = scored
    query = sorted((data / "contamination").glob("*.png"))[0]
    assert main(["similar", "--report", str(report), "--image", str(query), "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert "archived image" in out and out.count("file://") >= 5
    # a file that is not in the report is embedded with the report's model (recorded in its summary)
    new = small_model.data_dir / "train" / "good" / "000.png"
    assert main(["similar", "--report", str(report), "--image", str(new), "--k", "3", "--embedding", "peak"]) == 0
    assert "new file, embedded with" in capsys.readouterr().out


def test_cluster_export_and_diff(scored, tmp_path, capsys):
    report, data = scored
    assert main(["cluster", "--report", str(report), "--clusters", "3"]) == 0
    summary = json.loads((report / "mining" / "clusters.json").read_text())
    assert sum(g["size"] for g in summary["groups"]) == summary["images"] > 0
    dest = tmp_path / "export"
    assert (
        main(["export", "--report", str(report), "--where", "is_anomalous", "--cluster", "0", "--to", str(dest)]) == 0
    )
    lines = (dest / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == summary["groups"][0]["size"]
    assert all((dest / json.loads(line)["image"]).is_file() for line in lines)
    # the same run copied elsewhere: no flag changes, Spearman 1
    again = tmp_path / "again"
    shutil.copytree(report, again)
    assert main(["diff", str(report), str(again)]) == 0
    d = json.loads((again / "diff" / "diff.json").read_text())
    assert (d["newly_flagged"], d["cleared"], d["matched"]) == (0, 0, 16) and d["spearman"] == pytest.approx(1.0)
