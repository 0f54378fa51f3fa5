"""The review page: drawn from a synthetic report (no model), self-contained, with relative links that
resolve from the report folder; extra sections survive redraws; drift comparison numbers."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from patchaudit.review.data import collect, relative_href
from patchaudit.review.page import add_review_section, write_review_page
from patchaudit.scheduler.audit_drift import compare
from patchaudit.scheduler.audit_spec import DriftSpec
from patchaudit.scheduler.summary import summarize
from patchaudit.store import reports
from patchaudit.store.objects import open_store


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if a.get(k):
                self.links.append((tag, a[k]))


def _report(tmp_path: Path, n: int = 60):
    images = tmp_path / "in"
    report = open_store(str(tmp_path / "rep"))
    rows = []
    for i in range(n):
        folder = ["good", "crack", "blowhole"][i % 3]
        p = images / folder / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"png")
        uri = open_store(str(p.parent)).uri_for(p.name)
        row = {
            "run_id": "r1",
            "image_uri": uri,
            "size": 3,
            "etag": f"e{i}",
            "model_id": "m",
            "threshold": 1.0,
            "attempt": 1,
            "worker": "w",
        }
        if i % 17 == 5:
            row["error"] = "decode: not an image"
        else:
            score = 0.5 + (i % 3) * 0.4 + i / 100
            row.update(score=score, is_anomalous=score >= 1.0, anomalous_area_fraction=0.1, map_max=score)
            if score >= 1.0:
                key = f"heatmaps/{i:03d}.png"
                report.write_bytes(key, b"\x89PNG")
                row["heatmap_uri"] = report.uri_for(key)
        rows.append(row)
    reports.write_part(report, "b000000", rows)
    table = reports.read_report(report)
    summary = summarize(
        table,
        run_id="r1",
        model_id="m",
        threshold=1.0,
        top_k=5,
        seconds=2.0,
        n_listed=n,
        extra={"input_uri": open_store(str(images)).uri},
    )
    reports.write_summary(report, summary)
    return report, table, summary


def test_page_is_self_contained_and_links_resolve(tmp_path):
    report, table, summary = _report(tmp_path)
    write_review_page(report, table=table, summary=summary)
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert html.count("<svg") >= 2  # histogram and per-folder flag rate
    assert "threshold 1" in html and "crack" in html and "blowhole" in html
    assert "decode" in html  # the error table
    parser = _Links()
    parser.feed(html)
    imgs = [v for t, v in parser.links if t == "img"]
    assert imgs and all(not re.match(r"^[a-z]+://", v) for (v,) in [(x,) for x in imgs])
    for _, href in parser.links:  # every link is relative and points at an existing file
        assert not href.startswith(("/", "file:", "s3:")), href
        assert (tmp_path / "rep" / href).resolve().exists(), href
    d = collect(report)
    assert d.errors == sum(1 for i in range(60) if i % 17 == 5)
    assert d.scored + d.errors == 60
    assert sum(f.images for f in d.folders) == 60
    assert int(d.histogram.below.sum() + d.histogram.above.sum()) == d.scored
    assert int(d.histogram.above.sum()) == d.flagged
    assert [t["score"] for t in d.top] == sorted((t["score"] for t in d.top), reverse=True)


def test_sections_survive_redraws(tmp_path):
    report, _, _ = _report(tmp_path, 12)
    add_review_section(report, "50-diff", "Changes against the old model", "<p>diff-table-here</p>")
    write_review_page(report)
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "Changes against the old model" in html and "diff-table-here" in html
    write_review_page(report, extra_sections=[{"title": "Once", "html": "<p>x</p>"}])
    assert "Once" in (tmp_path / "rep" / "index.html").read_text()


@pytest.mark.parametrize(
    "src, dst, want",
    [
        (
            "s3://b/reports/line/2026-11-01/pass-001",
            "s3://b/reports/line/2026-11-01/pass-001/heatmaps/a.png",
            "heatmaps/a.png",
        ),
        ("s3://b/reports/x", "s3://b/images/2026/a b.png", "../../images/2026/a%20b.png"),
        ("s3://b/reports/x", "s3://other/images/a.png", None),
        ("file:///r/rep", "file:///r/in/good/a.png", "../in/good/a.png"),
        ("file:///r/rep", "s3://b/a.png", None),
    ],
)
def test_relative_href(src, dst, want):
    assert relative_href(src, dst) == want


def test_drift_compare():
    prev = {
        "run_id": "a",
        "scored": 100,
        "anomalous": 10,
        "errors": 0,
        "rows": 100,
        "score_distribution": {"p50": 1.0, "p90": 2.0},
    }
    now = {
        "run_id": "b",
        "scored": 100,
        "anomalous": 20,
        "errors": 5,
        "rows": 105,
        "score_distribution": {"p50": 1.5, "p90": 2.5},
    }
    c = compare(now, prev, DriftSpec(0.05, 20), {"pass": "2026-11-01/pass-001"})
    assert c["warning"] and c["flag_rate"]["delta"] == pytest.approx(0.10)
    assert c["error_rate"]["now"] == pytest.approx(5 / 105) and c["quantiles"]["p50"]["delta"] == pytest.approx(0.5)
    assert "DRIFT" in c["message"]
    assert not compare(now, prev, DriftSpec(0.15, 20))["warning"]
    assert not compare(now, prev, DriftSpec(0.05, 500))["warning"]  # too few images to warn
    assert compare(now, None, DriftSpec())["previous"] is None
