"""The mining commands on reports in S3 (SeaweedFS): diff, cluster, similar and export read and write s3://."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from synthetic_reports import Synthetic, write_report  # noqa: E402

from patchaudit.scheduler.cli import main  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture()
def bucket(s3_env) -> str:
    return s3_env.make_bucket(f"pa-mining-{uuid.uuid4().hex[:10]}")


def test_mining_commands_on_s3_reports(bucket, s3_env, tmp_path, capsys):
    root = f"s3://{bucket}/archive/line-7"
    old = write_report(f"s3://{bucket}/reports/old", Synthetic(120, batch_size=32, dim=8, clusters=3, root=root))
    new = write_report(
        f"s3://{bucket}/reports/new",
        Synthetic(120, seed=1, batch_size=32, dim=8, clusters=3, root=root, start=10, model_id="padim-x"),
    )
    # real image objects for the export (the synthetic report names them)
    from patchaudit.mining.reportio import open_report, read_columns
    from patchaudit.store.objects import open_store, resolve

    for r in read_columns(open_report(old), ["image_uri", "size", "heatmap_uri"]).to_pylist():
        store, key = resolve(r["image_uri"])
        store.write_bytes(key, b"x" * r["size"])
        if r["heatmap_uri"]:
            store, key = resolve(r["heatmap_uri"])
            store.write_bytes(key, b"png")
    assert main(["diff", old, new]) == 0
    summary = json.loads(open_store(new).read_bytes("diff/diff.json"))
    assert (summary["matched"], summary["only_old"], summary["only_new"]) == (110, 10, 10)
    assert "Compared with an earlier run" in open_store(new).read_bytes("index.html").decode()
    assert main(["cluster", "--report", old, "--clusters", "3", "--all"]) == 0
    capsys.readouterr()
    uri = read_columns(open_report(old), ["image_uri"])["image_uri"][5].as_py()
    assert main(["similar", "--report", old, "--image", uri, "--k", "4"]) == 0
    assert capsys.readouterr().out.count(root) == 5  # the query and 4 hits
    dest = f"s3://{bucket}/exports/one"
    argv = ["export", "--report", old, "--where", "score > 0", "--cluster", "1", "--limit", "7", "--to", dest]
    assert main(argv) == 0
    out = open_store(dest)
    manifest = [json.loads(line) for line in out.read_bytes("manifest.jsonl").decode().splitlines()]
    assert len(manifest) == 7 and all(out.exists(m["image"]) for m in manifest)
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 file(s) copied now" in capsys.readouterr().out
    assert main(["diff", old, f"s3://{bucket}/reports/none"]) == 2
    assert "no report at" in capsys.readouterr().err
