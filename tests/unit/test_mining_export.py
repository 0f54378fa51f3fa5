"""`patchaudit export`: selection by SQL predicate and cluster, copies, manifest, idempotence, resume, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from mining_fixtures import Synthetic, write_report
from PIL import Image

from patchaudit.mining.reportio import open_report, read_columns
from patchaudit.scheduler.cli import main


@pytest.fixture()
def report(tmp_path):
    """A synthetic report whose image and heatmap URIs point at real small files."""
    images = tmp_path / "archive"
    rep = tmp_path / "r"
    write_report(str(rep), Synthetic(60, seed=0, batch_size=16, dim=8, root=images.as_uri(), clusters=3))
    rows = read_columns(open_report(str(rep)), ["image_uri", "heatmap_uri"]).to_pylist()
    rng = np.random.default_rng(0)
    for r in rows:
        for uri in (r["image_uri"], r["heatmap_uri"]):
            if uri:
                path = uri.removeprefix("file://")
                import os

                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    # the synthetic report says every image has 250000 bytes; make the sizes true
    import pyarrow as pa
    import pyarrow.parquet as pq

    for part in sorted((rep / "parts").glob("*.parquet")):
        t = pq.read_table(part)
        sizes = [os.path.getsize(u.removeprefix("file://")) for u in t["image_uri"].to_pylist()]
        t = t.set_column(t.schema.get_field_index("size"), t.schema.field("size"), pa.array(sizes, pa.int64()))
        pq.write_table(t, part)
    return str(rep)


def test_export_selection_manifest_and_idempotence(report, tmp_path, capsys):
    dest = tmp_path / "out"
    argv = ["export", "--report", report, "--where", "is_anomalous AND folder LIKE '%cam-1'", "--to", str(dest)]
    assert main(argv) == 0
    rows = read_columns(open_report(report), ["image_uri", "is_anomalous", "score"]).to_pylist()
    want = sorted(
        (r for r in rows if r["is_anomalous"] and "/cam-1/" in r["image_uri"]),
        key=lambda r: (-r["score"], r["image_uri"]),
    )
    assert want
    manifest = [json.loads(line) for line in (dest / "manifest.jsonl").read_text().splitlines()]
    assert [m["source_uri"] for m in manifest] == [r["image_uri"] for r in want]  # highest score first
    with open(dest / "manifest.csv") as fh:
        assert [r["source_uri"] for r in csv.DictReader(fh)] == [m["source_uri"] for m in manifest]
    for m in manifest:
        assert (dest / m["image"]).is_file() and (dest / m["heatmap"]).is_file()
    assert json.loads((dest / "export.json").read_text())["status"] == "complete"
    before = (dest / "manifest.jsonl").read_bytes()
    capsys.readouterr()
    assert main(argv) == 0  # idempotent: nothing copied again, the same manifest
    assert "0 file(s) copied now" in capsys.readouterr().out
    assert (dest / "manifest.jsonl").read_bytes() == before


def test_export_resumes_after_an_interruption(report, tmp_path, capsys):
    dest = tmp_path / "out"
    argv = ["export", "--report", report, "--where", "score > 0", "--limit", "10", "--to", str(dest)]
    assert main(argv) == 0
    manifest = [json.loads(line) for line in (dest / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 10
    # as if killed midway: three images gone, no manifest yet
    for m in manifest[:3]:
        (dest / m["image"]).unlink()
    (dest / "manifest.jsonl").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    assert "3 file(s) copied now" in capsys.readouterr().out
    assert len((dest / "manifest.jsonl").read_text().splitlines()) == 10


def test_export_by_cluster(report, tmp_path):
    assert main(["cluster", "--report", report, "--clusters", "3", "--all"]) == 0
    dest = tmp_path / "c"
    assert main(["export", "--report", report, "--where", "true", "--cluster", "2", "--to", str(dest)]) == 0
    manifest = [json.loads(line) for line in (dest / "manifest.jsonl").read_text().splitlines()]
    assert manifest and {m["cluster"] for m in manifest} == {2}


@pytest.mark.parametrize(
    "where, message",
    [
        ("scor > 1", "not a valid predicate"),
        ("score >", "not a valid SQL predicate"),
        ("true); DROP TABLE images; SELECT (1", "one predicate"),
        ("", "empty"),
        ("image_uri IN (SELECT * FROM read_csv('/etc/hostname'))", "not a valid predicate"),
    ],
)
def test_bad_predicate_is_one_line_and_writes_nothing(report, tmp_path, capsys, where, message):
    dest = tmp_path / "never"
    assert main(["export", "--report", report, "--where", where, "--to", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not dest.exists()


def test_other_bad_input(report, tmp_path, capsys):
    dest = tmp_path / "never"
    assert main(["export", "--report", report, "--where", "true", "--cluster", "0", "--to", str(dest)]) == 2
    assert "run `patchaudit cluster" in capsys.readouterr().err
    assert main(["export", "--report", str(tmp_path / "nothing"), "--where", "true", "--to", str(dest)]) == 2
    assert "no report at" in capsys.readouterr().err
    assert not dest.exists()
    other = tmp_path / "other"
    assert main(["export", "--report", report, "--where", "score > 1", "--to", str(other)]) == 0
    assert main(["export", "--report", report, "--where", "score > 2", "--to", str(other)]) == 2
    assert "holds another export" in capsys.readouterr().err
