"""The audit's incremental logic with a stand-in scorer (no model, no Ray): the ledger skips what a line's
reports hold for the same model and etag, rescoring changed files, new images and everything for a new
model; an unfinished pass resumes under its own run id; a lost ledger part is rebuilt."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa

from patchaudit.scheduler.audit import RUN_KEY, Scorer, audit_night, audit_run_id
from patchaudit.scheduler.audit_spec import spec_from_dict
from patchaudit.scheduler.summary import summarize
from patchaudit.store import ledger, reports
from patchaudit.store.objects import ObjectInfo, open_store

DAY = dt.date(2026, 11, 1)


class FakeScorer(Scorer):
    """Writes a report like run_score would (plan marker, listing, one part per 3 images, summary), without
    a model; `die_after` parts simulates a killed run (planned, partly scored, no _SUCCESS)."""

    def __init__(self, model_id="m1", die_after=None):
        super().__init__(True, None, None, False)
        self.model_id, self.die_after, self.calls = model_id, die_after, []
        self.broken: set[str] = set()  # keys that get an error row

    def __call__(self, config, input_uri, model_uri, report, run_id, listing, model_id):
        self.calls.append((run_id, None if listing is None else [i.key for i in listing]))
        if listing is None:
            meta = json.loads(report.read_bytes(RUN_KEY))
            assert meta["run_id"] == run_id
            listing = reports.read_listing(report)
        else:
            reports.write_listing(report, listing)
            report.write_bytes(RUN_KEY, json.dumps({"run_id": run_id}).encode())
        have = set(reports.list_parts(report))
        for n, s in enumerate(range(0, len(listing), 3)):
            bid = f"b{n:06d}"
            if bid in have:
                continue
            if self.die_after is not None and n >= self.die_after:
                raise KeyboardInterrupt("killed")
            rows = [
                {
                    "run_id": run_id,
                    "image_uri": i.uri,
                    "size": i.size,
                    "etag": i.etag,
                    "model_id": model_id,
                    "threshold": 10.0,
                    "attempt": 1,
                    "worker": "fake",
                    **(
                        {"error": "decode: broken"}
                        if i.key in self.broken
                        else {"score": float(len(i.key)), "is_anomalous": "bad" in i.key}
                    ),
                }
                for i in listing[s : s + 3]
            ]
            reports.write_part(report, bid, rows)
        table = reports.read_report(report)
        summary = summarize(
            table,
            run_id=run_id,
            model_id=model_id,
            threshold=10.0,
            top_k=5,
            seconds=1.0,
            n_listed=len(listing),
            extra={"input_uri": input_uri},
        )
        reports.write_summary(report, summary)
        return summary


def _setup(tmp_path: Path, n_images: int = 10):
    arch = tmp_path / "arch" / DAY.isoformat()
    for i in range(n_images):
        p = arch / ("bad" if i % 4 == 0 else "good") / f"img{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * (i + 1))
    (arch / "notes.txt").write_text("not an image: skipped, never planned")
    spec = spec_from_dict(
        {
            "lines": [
                {
                    "name": "l1",
                    "input": str(tmp_path / "arch" / "{date:%Y-%m-%d}"),
                    "model": str(tmp_path / "model"),
                    "report_root": str(tmp_path / "reports"),
                }
            ]
        },
        "s.yaml",
    )
    return spec.lines[0], arch


def _union(root_uri: str) -> list[tuple[str, str]]:
    root = open_store(root_uri)
    out = []
    for p in ledger.recorded_passes(root):
        t = reports.read_report(root.child(p))
        out += list(zip(t["image_uri"].to_pylist(), t["etag"].to_pylist()))
    return out


def test_incremental_new_changed_and_new_model(tmp_path):
    line, arch = _setup(tmp_path)
    r1 = audit_night(line, DAY, "m1", FakeScorer())
    assert (r1.listed, r1.already, r1.scored, r1.passes) == (10, 0, 10, ["2026-11-01/pass-001"])
    assert r1.skipped == 1
    assert r1.comparison["previous"] is None
    r2 = audit_night(line, DAY, "m1", FakeScorer())
    assert (r2.listed, r2.already, r2.scored, r2.passes) == (10, 10, 0, [])
    # late arrivals and one changed file (new content -> new etag)
    for i in range(10, 15):
        (arch / "good" / f"img{i:03d}.png").write_bytes(b"y" * (i + 1))
    changed = arch / "good" / "img001.png"
    changed.write_bytes(b"changed content, another size")
    scorer = FakeScorer()
    r3 = audit_night(line, DAY, "m1", scorer)
    assert (r3.listed, r3.already, r3.scored) == (15, 9, 6)
    assert sorted(scorer.calls[0][1]) == sorted(["good/img001.png"] + [f"good/img{i:03d}.png" for i in range(10, 15)])
    assert r3.comparison["previous"]["pass"] == "2026-11-01/pass-001"
    # every (image, etag) exactly once in the union of the line's reports, and every current one there
    union = _union(line.report_root)
    assert len(union) == len(set(union)) == 16
    current = {(i.uri, i.etag) for i in open_store(str(arch)).list(extensions=".png")}
    assert current <= set(union)
    # a new model rescores everything
    r4 = audit_night(line, DAY, "m2", FakeScorer(model_id="m2"))
    assert (r4.already, r4.scored) == (0, 15)
    assert ledger.recorded_passes(open_store(line.report_root))[-1] == "2026-11-01/pass-003"


def test_killed_pass_resumes_with_its_run_id(tmp_path):
    line, _ = _setup(tmp_path, 10)
    try:
        audit_night(line, DAY, "m1", FakeScorer(die_after=2))
    except KeyboardInterrupt:
        pass
    root = open_store(line.report_root)
    report = root.child("2026-11-01/pass-001")
    assert root.child("2026-11-01/pass-001").exists(RUN_KEY) and not reports.is_complete(report)
    assert reports.list_parts(report) == ["b000000", "b000001"]
    assert ledger.recorded_passes(root) == []
    scorer = FakeScorer()
    r = audit_night(line, DAY, "m1", scorer)
    assert r.resumed == ["2026-11-01/pass-001"] and r.passes == ["2026-11-01/pass-001"]
    assert scorer.calls == [(audit_run_id("l1", "2026-11-01", 1, root.uri), None)]  # resumed, nothing new after
    assert len(_union(line.report_root)) == 10 == len(set(_union(line.report_root)))
    assert audit_night(line, DAY, "m1", FakeScorer()).scored == 0


def test_lost_ledger_part_is_rebuilt(tmp_path):
    line, _ = _setup(tmp_path, 6)
    audit_night(line, DAY, "m1", FakeScorer())
    root = open_store(line.report_root)
    root.delete(ledger.part_key("2026-11-01/pass-001"))  # a crash between _SUCCESS and the ledger part
    r = audit_night(line, DAY, "m1", FakeScorer())
    assert r.scored == 0 and ledger.recorded_passes(root) == ["2026-11-01/pass-001"]


def test_unscored_is_an_anti_join_in_listing_order():
    infos = [ObjectInfo(f"k{i}", 1, f"e{i}", f"file:///a/k{i}") for i in range(6)]
    led = pa.table(
        {
            "image_uri": ["file:///a/k1", "file:///a/k3", "file:///a/k4"],
            "etag": ["e1", "old", "e4"],
            "model_id": ["m"] * 3,
            "pass": ["2026-01-01/pass-001"] * 3,
            "error": [False] * 3,
        },
        schema=ledger.LEDGER_SCHEMA,
    )
    assert [i.key for i in ledger.unscored(infos, led)] == ["k0", "k2", "k3", "k5"]
    assert ledger.unscored([], led) == []
    assert len(ledger.unscored(infos, ledger.LEDGER_SCHEMA.empty_table())) == 6


def test_a_failing_night_does_not_stop_the_others(tmp_path, monkeypatch):
    from patchaudit.scheduler import audit

    line, _ = _setup(tmp_path, 4)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    bad = spec_from_dict(
        {
            "lines": [
                {
                    "name": "bad",
                    "input": line.input,
                    "model": "unused",
                    "report_root": str(tmp_path / "blocker" / "reports"),
                },
                {"name": "l1", "input": line.input, "model": "unused", "report_root": line.report_root},
            ]
        },
        "s.yaml",
    )
    monkeypatch.setattr(audit, "preflight", lambda lines: {x.name: "m1" for x in lines})
    monkeypatch.setattr(audit, "Scorer", lambda *args: FakeScorer())
    seen = []
    results = audit.run_audit(bad, bad.lines, [DAY], single_process=True, on_result=seen.append)
    assert [r.status for r in results] == ["failed", "ok"] and seen == results
    assert results[0].error and "\n" not in results[0].error
    assert results[1].scored == 4
    assert audit.exit_code(results, fail_on_drift=False) == 1
    text = audit.format_result(results[0]) + "\n" + audit.format_result(results[1])
    assert "FAILED" in text and "scored now 4" in text and "review:" in text


def test_error_rows_count_as_done_unless_retried(tmp_path):
    line, _ = _setup(tmp_path, 6)
    scorer = FakeScorer()
    scorer.broken = {"good/img001.png", "good/img002.png"}
    assert audit_night(line, DAY, "m1", scorer).errors == 2
    assert audit_night(line, DAY, "m1", FakeScorer()).scored == 0  # errors are accounted for
    retry = FakeScorer()
    r = audit_night(line, DAY, "m1", retry, retry_errors=True)
    assert (r.scored, r.errors) == (2, 0) and sorted(retry.calls[0][1]) == sorted(scorer.broken)
    assert audit_night(line, DAY, "m1", FakeScorer(), retry_errors=True).scored == 0  # now scored
