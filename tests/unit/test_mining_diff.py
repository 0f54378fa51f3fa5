"""`patchaudit diff`: counts, flips, Spearman and per-folder rates against a plain reference; bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from mining_fixtures import Synthetic, write_report
from scipy.stats import spearmanr

from patchaudit.errors import MiningError
from patchaudit.mining.diff import compute_diff
from patchaudit.mining.reportio import open_report, read_columns
from patchaudit.scheduler.cli import main


@pytest.fixture()
def two_reports(tmp_path):
    old = write_report(str(tmp_path / "old"), Synthetic(600, seed=0, batch_size=100, errors_every=53, dim=8))
    new = write_report(
        str(tmp_path / "new"),
        Synthetic(
            600,
            seed=1,
            batch_size=128,
            start=40,
            changed_etag_every=37,
            model_id="padim-synthetic-1",
            threshold=1.1,
            dim=8,
        ),
    )
    return old, new


def _reference(old_uri, new_uri):
    cols = ["image_uri", "etag", "score", "is_anomalous", "threshold", "error"]
    o = read_columns(open_report(old_uri), cols).to_pylist()
    n = {r["image_uri"]: r for r in read_columns(open_report(new_uri), cols).to_pylist()}
    matched = [(a, n[a["image_uri"]]) for a in o if a["image_uri"] in n and n[a["image_uri"]]["etag"] == a["etag"]]
    both = [(a, b) for a, b in matched if a["error"] is None and b["error"] is None]
    return o, n, matched, both


def test_diff_matches_a_plain_reference(two_reports):
    old_uri, new_uri = two_reports
    res = compute_diff(open_report(old_uri), open_report(new_uri))
    s = res.summary
    o, n, matched, both = _reference(old_uri, new_uri)
    assert s["matched"] == len(matched) and s["scored_in_both"] == len(both)
    up = {a["image_uri"] for a, b in both if not a["is_anomalous"] and b["is_anomalous"]}
    down = {a["image_uri"] for a, b in both if a["is_anomalous"] and not b["is_anomalous"]}
    assert up and down  # the fixture must exercise both directions
    assert s["newly_flagged"] == len(up) and s["cleared"] == len(down)
    got = res.changes.to_pydict()
    assert set(got["image_uri"]) == up | down
    assert {u for u, d in zip(got["image_uri"], got["direction"]) if d == "newly_flagged"} == up
    rel = np.abs(np.array(got["rel_change"]))
    assert np.all(rel[:-1] >= rel[1:] - 1e-12)  # largest relative change first
    rho = spearmanr([a["score"] for a, _ in both], [b["score"] for _, b in both]).statistic
    assert s["spearman"] == pytest.approx(rho, abs=1e-9)
    old_uris = {r["image_uri"] for r in o}
    assert s["only_old"] == len(old_uris - set(n)) == 40
    assert s["only_new"] == len(set(n) - old_uris) == 40
    assert s["etag_changed"] == sum(1 for a in o if a["image_uri"] in n and n[a["image_uri"]]["etag"] != a["etag"]) > 0
    assert not s["same_model"]


def test_folder_rates(two_reports):
    old_uri, new_uri = two_reports
    res = compute_diff(open_report(old_uri), open_report(new_uri))
    o, n, _, _ = _reference(old_uri, new_uri)
    rows = {r["folder"]: r for r in res.folders.to_pylist()}
    folder = "s3://archive/line-7/2026/12/02/cam-3"
    scored_old = [r for r in o if r["image_uri"].startswith(folder + "/") and r["error"] is None]
    scored_new = [r for r in n.values() if r["image_uri"].startswith(folder + "/") and r["error"] is None]
    assert rows[folder]["old_images"] == sum(r["image_uri"].startswith(folder + "/") for r in o)
    assert rows[folder]["old_flag_rate"] == pytest.approx(np.mean([r["is_anomalous"] for r in scored_old]))
    assert rows[folder]["new_flag_rate"] == pytest.approx(np.mean([r["is_anomalous"] for r in scored_new]))


def test_cli_writes_parquet_and_summary_last(two_reports, tmp_path, capsys):
    old_uri, new_uri = two_reports
    assert main(["diff", old_uri, new_uri, "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "Spearman" in out and "newly_flagged" in out
    summary = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert pq.read_table(tmp_path / "d" / "changes.parquet").num_rows == summary["newly_flagged"] + summary["cleared"]
    assert pq.read_table(tmp_path / "d" / "unmatched.parquet").num_rows == 40 + 40 + summary["etag_changed"]


def test_default_output_is_inside_the_new_report_with_a_review_section(two_reports):
    from patchaudit.store.objects import open_store

    old_uri, new_uri = two_reports
    assert main(["diff", old_uri, new_uri]) == 0
    new = open_store(new_uri)
    assert new.exists("diff/diff.json") and new.exists("diff/diff.html")
    review = new.read_bytes("index.html").decode()
    assert "Compared with an earlier run" in review and "newly flagged" in review


def test_missing_report_is_one_line_exit_2(two_reports, tmp_path, capsys):
    old_uri, _ = two_reports
    assert main(["diff", old_uri, str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no report at" in err
    assert not (tmp_path / "nope").exists()


def test_report_of_another_line_is_refused_and_nothing_written(tmp_path, capsys):
    a = write_report(str(tmp_path / "bottle"), Synthetic(50, dim=4, root="s3://archive/bottle/2026/12/02"))
    b = write_report(
        str(tmp_path / "tile"), Synthetic(50, dim=4, root="s3://archive/tile/2026/12/02", model_id="patchcore-tile-2")
    )
    assert main(["diff", a, b]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "share no image" in err and "patchcore-tile-2" in err
    assert not (tmp_path / "tile" / "diff").exists()
    with pytest.raises(MiningError, match="same report"):
        from patchaudit.mining import commands

        commands.diff(a, a)
