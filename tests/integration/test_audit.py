"""`patchaudit audit` end to end: two product lines (MVTec bottle and magnetic tile), their test images
spread over two nights, scored through Redis and a local 2-CPU Ray on loopback, with the archive and the
reports on file:// and on s3:// (SeaweedFS).

- the first audit scores every image of both lines and nights; the second scores 0;
- after 5 new images arrive and 1 file changes, exactly those 6 are scored;
- every (image, etag) appears exactly once in the union of a line's reports;
- an audit killed with SIGKILL mid-run (a subprocess, its own Ray) resumes under the same run id.

Models are tiny (10 training images, 128x128), and each line uses a seeded subset of its test images
(bottle: 4 per folder, magnetic tile: 3 per folder), so a full audit stays short on 2 shared cores.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures_dist import (
    fit_small,
    loopback_ray,
    point_aws_at,
    redis_url,  # noqa: F401 (fixture)
    wait_until,
)

pytestmark = pytest.mark.integration

BUCKET = "patchaudit-audit"
NIGHTS = (dt.date(2026, 11, 1), dt.date(2026, 11, 2))
PER_FOLDER = {"bottle": 4, "tile": 3}
EXTRA_PER_LINE = 5  # images kept back from the first nights: the "late arrivals"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class LineData:
    name: str
    category: Path  # the MVTec-style category dir
    files: tuple[Path, ...]  # test images of the first nights (relative to category/test)
    extra: tuple[Path, ...]  # late arrivals
    model_uri: str


def _pick(category: Path, per_folder: int, extra: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(seed)
    chosen, rest = [], []
    for folder in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg"))
        order = rng.permutation(len(files))
        chosen += [files[i] for i in sorted(order[:per_folder])]
        rest += [files[i] for i in sorted(order[per_folder : per_folder + 2])]
    return chosen, rest[:extra]


@pytest.fixture(scope="module")
def lines(bottle_dir: Path, magnetic_tile_dir: Path, tmp_path_factory) -> dict[str, LineData]:
    out = {}
    for name, category in (("bottle", bottle_dir), ("tile", magnetic_tile_dir)):
        model = tmp_path_factory.mktemp(f"model-{name}")
        uri = fit_small(category, model, n_train=10, image_size=(128, 128))
        files, extra = _pick(category, PER_FOLDER[name], EXTRA_PER_LINE)
        out[name] = LineData(name, category, tuple(files), tuple(extra), uri)
    return out


def _night(i: int) -> dt.date:
    return NIGHTS[i % len(NIGHTS)]


def _rel(line: LineData, p: Path) -> str:
    return p.relative_to(line.category / "test").as_posix()


class Archive:
    """Where a night's images of a line live: a local folder tree or an S3 prefix."""

    def __init__(self, root: str):
        from patchaudit.store.objects import open_store

        self.root = root.rstrip("/")
        self.store = open_store(self.root)

    def put(self, line: str, night: dt.date, key: str, data: bytes) -> None:
        # write_bytes replaces the object (a new inode on disk): the shared data is never touched
        self.store.write_bytes(f"arch/{line}/{night.isoformat()}/{key}", data)

    def listing(self, line: str) -> set[tuple[str, str]]:
        return {(i.uri, i.etag) for i in self.store.list(f"arch/{line}/")}

    def spec(self, lines: dict[str, LineData], redis: str, **run: Any) -> Any:
        from patchaudit.scheduler.audit_spec import spec_from_dict

        return spec_from_dict(
            {
                "config": {"run": {"batch_size": 4, "redis_url": redis, "reclaim_idle_s": 2.0, **run}},
                "lines": [
                    {
                        "name": n,
                        "input": f"{self.root}/arch/{n}/{{date:%Y-%m-%d}}",
                        "model": d.model_uri,
                        "report_root": f"{self.root}/reports/{n}",
                    }
                    for n, d in lines.items()
                ],
            },
            "test-spec",
        )


def _fill(archive: Archive, lines: dict[str, LineData]) -> None:
    for name, line in lines.items():
        for i, p in enumerate(line.files):
            archive.put(name, _night(i), _rel(line, p), p.read_bytes())


def _union(root: str) -> list[tuple[str, str]]:
    """(image URI, etag) of every row in every pass of a line."""
    from patchaudit.store import ledger, reports
    from patchaudit.store.objects import open_store

    store = open_store(root)
    rows = []
    for p in ledger.recorded_passes(store):
        t = reports.read_report(store.child(p))
        assert t["error"].null_count == t.num_rows, f"{p}: error rows {t.filter(t['error'].is_valid())}"
        rows += list(zip(t["image_uri"].to_pylist(), t["etag"].to_pylist()))
    return rows


def _assert_exactly_once(archive: Archive, spec: Any) -> None:
    for line in spec.lines:
        union = _union(line.report_root)
        dupes = {r for r in union if union.count(r) > 1}
        assert not dupes, f"line {line.name}: scored more than once: {sorted(dupes)[:3]}"
        missing = archive.listing(line.name) - set(union)
        assert not missing, f"line {line.name}: never scored: {sorted(missing)[:3]}"


def _scored(results) -> dict[tuple[str, str], int]:
    assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"]
    return {(r.line, r.date): r.scored for r in results}


def _cleanup_redis(redis: str, spec: Any) -> None:
    import redis as redis_lib

    from patchaudit.queue.streams import BatchQueue
    from patchaudit.store import ledger
    from patchaudit.store.objects import open_store

    client = redis_lib.Redis.from_url(redis)
    for line in spec.lines:
        root = open_store(line.report_root)
        for p in ledger.recorded_passes(root):
            import json

            BatchQueue(client, json.loads(root.child(p).read_bytes("run.json"))["run_id"]).delete()
    client.close()


@pytest.fixture(scope="module")
def aws_env(s3_server) -> Iterator[Any]:
    """The test S3 server's settings for the whole module, set before Ray starts (its workers inherit them)."""
    with pytest.MonkeyPatch.context() as mp:
        point_aws_at(mp, s3_server)
        yield s3_server


@pytest.fixture(scope="module")
def ray_audit(aws_env) -> Iterator[Any]:
    with loopback_ray(num_cpus=2) as ray:
        yield ray


@pytest.mark.parametrize("where", ["file", "s3"])
def test_audit_incremental(where, ray_audit, aws_env, lines, redis_url, tmp_path) -> None:  # noqa: F811
    from patchaudit.scheduler.audit import run_audit

    if where == "s3":
        aws_env.make_bucket(BUCKET)
        archive = Archive(f"s3://{BUCKET}/audit-{uuid.uuid4().hex[:8]}")
    else:
        archive = Archive(str(tmp_path / "site"))
    _fill(archive, lines)
    spec = archive.spec(lines, redis_url)
    try:
        per_night = {(n, d.isoformat()): 0 for n in lines for d in NIGHTS}
        for name, line in lines.items():
            for i in range(len(line.files)):
                per_night[(name, _night(i).isoformat())] += 1

        first = run_audit(spec, spec.lines, NIGHTS, progress=False)
        assert _scored(first) == per_night  # everything
        assert all(r.report_uri for r in first)
        _assert_exactly_once(archive, spec)

        second = run_audit(spec, spec.lines, NIGHTS, progress=False)
        assert _scored(second) == {k: 0 for k in per_night}  # nothing new
        assert all(not r.passes and r.already == r.listed for r in second)

        # 5 late arrivals for the bottle's first night, and one changed file of the tile's second night
        bottle, tile = lines["bottle"], lines["tile"]
        for p in bottle.extra:
            archive.put("bottle", NIGHTS[0], _rel(bottle, p), p.read_bytes())
        changed = tile.files[1]  # index 1: the second night
        archive.put("tile", NIGHTS[1], _rel(tile, changed), tile.extra[0].read_bytes())
        third = run_audit(spec, spec.lines, NIGHTS, progress=False)
        expect = {k: 0 for k in per_night}
        expect[("bottle", NIGHTS[0].isoformat())] = EXTRA_PER_LINE
        expect[("tile", NIGHTS[1].isoformat())] = 1
        assert _scored(third) == expect
        assert sum(expect.values()) == 6
        _assert_exactly_once(archive, spec)
        for r in third:
            if r.passes:  # the new pass is compared with the line's previous run and has a review page
                assert r.comparison and r.comparison["previous"]["pass"]
                from patchaudit.store.objects import open_store

                page = open_store(r.report_uri).read_bytes("index.html").decode()
                assert "Compared with the previous run of the line" in page and "<svg" in page
                if where == "s3":  # an S3 static website serves it as a page only with this type
                    bucket, key = r.report_uri[len("s3://") :].split("/", 1)
                    head = aws_env.client().head_object(Bucket=bucket, Key=f"{key}/index.html")
                    assert head["ContentType"].startswith("text/html"), head["ContentType"]
    finally:
        _cleanup_redis(redis_url, spec)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the audit and everything it started (its own session: its Ray processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_killed_audit_resumes(ray_audit, lines, redis_url, tmp_path) -> None:  # noqa: F811
    import yaml

    from patchaudit.scheduler.audit import audit_run_id, run_audit
    from patchaudit.store import reports
    from patchaudit.store.objects import open_store

    archive = Archive(str(tmp_path / "site"))
    bottle = dataclasses.replace(lines["bottle"], files=lines["bottle"].files + lines["bottle"].extra)
    night = NIGHTS[0]
    for p in bottle.files:  # every image on one night: more batches to be killed in the middle of
        archive.put("bottle", night, _rel(bottle, p), p.read_bytes())
    spec = archive.spec({"bottle": bottle}, redis_url, batch_size=2)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "config": {"run": {"batch_size": 2, "redis_url": redis_url, "reclaim_idle_s": 2.0}},
                "lines": [
                    {
                        "name": "bottle",
                        "input": spec.lines[0].input,
                        "model": bottle.model_uri,
                        "report_root": spec.lines[0].report_root,
                    }
                ],
            }
        )
    )
    report = open_store(spec.lines[0].report_root).child(f"{night.isoformat()}/pass-001")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "patchaudit.scheduler.cli",
        "audit",
        "--spec",
        str(spec_file),
        "--date",
        night.isoformat(),
        "--json",
    ]
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_until(
                lambda: proc.poll() is not None or reports.list_parts(report),
                300,
                "the first report part of the audit to be killed",
            )
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
        finally:
            _kill_group(proc)
    assert not reports.is_complete(report), "the audit finished before it was killed; nothing to resume"
    done_before = len(reports.list_parts(report))
    run_id = audit_run_id("bottle", night.isoformat(), 1, open_store(spec.lines[0].report_root).uri)
    try:
        results = run_audit(spec, spec.lines, [night], progress=False)
        (r,) = results
        assert r.status == "ok", r.error
        assert r.resumed == [f"{night.isoformat()}/pass-001"] and r.passes == r.resumed
        summary = reports.read_summary(report)
        assert summary["run_id"] == run_id and summary["resumed"] is True
        assert summary["rows"] == len(bottle.files) > done_before
        _assert_exactly_once(archive, spec)
        again = run_audit(spec, spec.lines, [night], progress=False)
        assert again[0].scored == 0
    finally:
        _cleanup_redis(redis_url, spec)
    shutil.rmtree(tmp_path / "site", ignore_errors=True)
