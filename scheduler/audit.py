"""`patchaudit audit`: one scoring run per product line and night, incremental and resumable.

For each selected line and date:
  1. Passes of that night (`<report root>/<date>/pass-NNN/`) that were planned but never finished
     are resumed under their own run id (a killed audit picks up where it stopped), and every
     finished pass gets its ledger part (store.ledger) if a crash left it without one.
  2. The night's input prefix is listed again; images whose (URI, etag) the line's ledger holds for
     this model are skipped, so a rerun over an unchanged night scores 0 images, a late arrival or a
     changed file is scored, and a new model scores everything.
  3. What is left is scored as a new pass with a deterministic run id, recorded in the ledger, and
     compared with the line's previous run (scheduler.audit_drift); the comparison goes into the
     pass's review page.
All lines share one Ray connection and one Redis. Spec and argument errors stop everything before
anything is written; a failing night is reported and the other nights go on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc

from patchaudit.errors import ConfigError, PatchauditError
from patchaudit.scheduler.audit_drift import compare
from patchaudit.scheduler.audit_spec import AuditSpec, LineSpec
from patchaudit.scheduler.config import Config
from patchaudit.store import compaction, ledger, reports
from patchaudit.store.artifacts import read_manifest
from patchaudit.store.objects import ObjectInfo, ObjectStore, open_store

log = logging.getLogger(__name__)

RUN_KEY = "run.json"  # the same marker scheduler.run writes when it plans a run


@dataclass
class NightResult:
    line: str
    date: str
    input_uri: str
    status: str = "ok"  # ok | failed
    listed: int = 0
    already: int = 0  # listed images the ledger already holds for this model
    skipped: int = 0  # files under the prefix that are not images (or unreadable names): not planned
    scored: int = 0  # rows written by this audit (new pass plus resumed ones)
    flagged: int = 0
    errors: int = 0
    passes: list[str] = field(default_factory=list)  # passes this audit ran (resumed first)
    resumed: list[str] = field(default_factory=list)
    report_uri: str | None = None  # the newest pass's report
    comparison: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def audit_run_id(line: str, date: str, number: int, root_uri: str) -> str:
    """Deterministic: the same line, night, pass and report root always give the same run id."""
    digest = hashlib.sha1(root_uri.rstrip("/").encode()).hexdigest()[:8]
    return f"audit-{line}-{date}-p{number:03d}-{digest}"


def _pass_states(root: ObjectStore, date: str) -> list[tuple[str, bool]]:
    """(pass name, complete) for the night's passes that were planned (have run.json), in order."""
    out: list[tuple[str, bool]] = []
    n = 1
    while True:
        name = ledger.pass_name(date, n)
        store = root.child(name)
        if not store.exists(RUN_KEY):
            return out
        out.append((name, reports.is_complete(store)))
        n += 1


def _clear_leftovers(report: ObjectStore) -> None:
    """A pass number that was never planned (no run.json) may hold a killed attempt's files: drop its parts."""
    compaction.clear(report)
    for batch_id in reports.list_parts(report):
        report.delete(reports.part_key(batch_id))
    report.delete(reports.SUMMARY_KEY)
    reports.clear_complete(report)


class Scorer:
    """Runs one pass: distributed (run_score, shared Ray and Redis) or in this process."""

    def __init__(self, single_process: bool, redis_url: str | None, workers: int | None, progress: bool):
        self.single_process, self.redis_url, self.workers, self.progress = single_process, redis_url, workers, progress

    def __call__(
        self,
        config: Config,
        input_uri: str,
        model_uri: str,
        report: ObjectStore,
        run_id: str,
        listing: Sequence[ObjectInfo] | None,
        model_id: str,
    ) -> dict[str, Any]:
        if self.single_process:
            from patchaudit.scheduler.local import score_single

            # score_single plans like a distributed run: it writes run.json and resumes its own pass.
            return score_single(
                config, input_uri, model_uri, report.uri, run_id, listing=None if listing is None else list(listing)
            )
        from patchaudit.scheduler.run import run_score

        config = dataclasses.replace(config, run=dataclasses.replace(config.run, redis_url=self.redis_url))
        return run_score(
            config,
            input_uri,
            model_uri,
            report.uri,
            run_id,
            workers=self.workers,
            progress=self.progress,
            listing=listing,
        )


def _previous_summary(root: ObjectStore, current: str) -> tuple[str, dict[str, Any]] | None:
    """The line's run just before pass `current` (by date, then pass number), with its summary."""

    def order(name: str) -> tuple[str, int]:
        m = ledger.PASS_RE.match(name)
        assert m is not None  # recorded_passes returns only matching names
        return m.group(1), int(m.group(2))

    earlier = [p for p in ledger.recorded_passes(root) if order(p) < order(current)]
    for name in reversed(earlier):
        store = root.child(name)
        if store.exists(reports.SUMMARY_KEY):
            return name, reports.read_summary(store)
    return None


def _review(root: ObjectStore, line: LineSpec, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Compare pass `name` with the line's previous run; store the comparison and redraw the review page."""
    from patchaudit.review.data import COMPARISON_KEY, relative_href
    from patchaudit.review.page import PAGE_KEY, write_review_page

    report = root.child(name)
    prev = _previous_summary(root, name)
    ref = None
    if prev is not None:
        prev_store = root.child(prev[0])
        ref = {
            "pass": prev[0],
            "report_uri": prev_store.uri,
            "report_href": relative_href(report.uri, prev_store.uri_for(PAGE_KEY)),
        }
    comparison = compare(summary, prev[1] if prev else None, line.drift, ref)
    report.write_bytes(COMPARISON_KEY, json.dumps(comparison, indent=2).encode())
    try:
        write_review_page(report, summary={**summary, "title": f"Audit of line {line.name}, {name}"})
    except Exception as exc:  # noqa: BLE001 - the pass and its ledger part are complete
        log.warning("could not redraw the review page of %s: %s", report.uri, exc)
    return comparison


def audit_night(
    line: LineSpec, date: dt.date, model_id: str, scorer: Scorer, retry_errors: bool = False
) -> NightResult:
    """Resume, list, skip what the ledger holds, score the rest as a new pass (module docstring).

    `retry_errors`: images whose only rows are error rows (undecodable, dead-lettered) are scored again.
    """
    day = date.isoformat()
    res = NightResult(line.name, day, line.input_for(date))
    t0 = time.perf_counter()
    root = open_store(line.report_root)
    src = open_store(res.input_uri)
    states = _pass_states(root, day)
    summaries: list[tuple[str, dict[str, Any]]] = []
    for name, complete in states:
        if not complete:  # planned, never finished: resume it under its own run id
            meta = json.loads(root.child(name).read_bytes(RUN_KEY))
            log.info("line %s %s: resuming %s (run %s)", line.name, day, name, meta["run_id"])
            summaries.append(
                (
                    name,
                    scorer(
                        line.config,
                        meta.get("input_uri", src.uri),
                        line.model,
                        root.child(name),
                        meta["run_id"],
                        None,
                        model_id,
                    ),
                )
            )
            res.resumed.append(name)
        if not ledger.has_pass(root, name):
            ledger.record_pass(root, name)
    from patchaudit.scheduler.plan import list_input

    infos, skipped = list_input(src)  # the same listing rules (and skips) as a plain run
    res.skipped = len(skipped)
    held = ledger.read_ledger(root, model_id)
    if retry_errors:
        held = held.filter(pc.invert(held["error"]))
    todo = ledger.unscored(infos, held)
    res.listed, res.already = len(infos), len(infos) - len(todo)
    if todo:
        number = len(states) + 1
        name = ledger.pass_name(day, number)
        report = root.child(name)
        _clear_leftovers(report)
        run_id = audit_run_id(line.name, day, number, root.uri)
        summaries.append((name, scorer(line.config, src.uri, line.model, report, run_id, todo, model_id)))
        ledger.record_pass(root, name)
    for name, summary in summaries:
        res.passes.append(name)
        res.scored += int(summary.get("rows", 0))
        res.flagged += int(summary.get("anomalous", 0))
        res.errors += int(summary.get("errors", 0))
        res.comparison = _review(root, line, name, summary)
        res.report_uri = root.child(name).uri
    res.seconds = time.perf_counter() - t0
    return res


def preflight(lines: Sequence[LineSpec]) -> dict[str, str]:
    """Check every selected line before anything is written: its model must load. Returns model ids."""
    ids = {}
    for line in lines:
        try:
            ids[line.name] = read_manifest(open_store(line.model))["model_id"]
        except PatchauditError as exc:
            raise ConfigError(f"line {line.name}: model {line.model}: {exc}") from None
    return ids


def shared_redis_url(lines: Sequence[LineSpec]) -> str | None:
    urls = {line.config.run.redis_url for line in lines}
    if len(urls) > 1:
        raise ConfigError(
            f"the lines name different run.redis_url values {sorted(map(str, urls))}; "
            "an audit drives all lines through one Redis"
        )
    return urls.pop()


def run_audit(
    spec: AuditSpec,
    lines: Sequence[LineSpec],
    dates: Sequence[dt.date],
    *,
    single_process: bool = False,
    workers: int | None = None,
    progress: bool = True,
    retry_errors: bool = False,
    on_result: Callable[[NightResult], None] | None = None,
) -> list[NightResult]:
    """Audit `lines` x `dates`; returns one result per night (failures included, never raised)."""
    model_ids = preflight(lines)
    redis_url = shared_redis_url(lines)
    results: list[NightResult] = []
    handle = None
    started_ray = False
    try:
        if not single_process:
            from patchaudit.scheduler.local_redis import ensure_redis
            from patchaudit.scheduler.run import _ensure_ray

            handle = ensure_redis(redis_url)  # one Redis for all lines (a private one lives for the audit)
            started_ray = _ensure_ray()  # one Ray connection: run_score reuses it and leaves it up
        scorer = Scorer(single_process, handle.url if handle else None, workers, progress)
        for line in lines:
            for date in dates:
                try:
                    res = audit_night(line, date, model_ids[line.name], scorer, retry_errors)
                except Exception as exc:  # noqa: BLE001 - one failing night must not stop the others
                    log.debug("line %s %s failed:\n%s", line.name, date, traceback.format_exc())
                    res = NightResult(
                        line.name,
                        date.isoformat(),
                        line.input_for(date),
                        status="failed",
                        error=f"{type(exc).__name__}: {exc}" if not isinstance(exc, PatchauditError) else str(exc),
                    )
                results.append(res)
                if on_result:
                    on_result(res)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        if handle is not None:
            handle.close()
    return results


def format_result(r: NightResult) -> str:
    """A few lines per night: what was listed, skipped, scored, the drift check and the review page."""
    head = f"line {r.line}  {r.date}  {r.input_uri}"
    if r.status == "failed":
        return f"{head}\n  FAILED: {r.error}"
    out = [
        head,
        f"  listed {r.listed}, already in the ledger {r.already}, scored now {r.scored} "
        f"(flagged {r.flagged}, errors {r.errors})"
        + (f", {r.skipped} non-image file(s) skipped" if r.skipped else "")
        + (f" -> {', '.join(r.passes)}" if r.passes else "")
        + f"  [{r.seconds:.1f}s]",
    ]
    if r.resumed:
        out.append(f"  resumed unfinished pass(es): {', '.join(r.resumed)}")
    if r.comparison:
        out.append(f"  {r.comparison['message']}")
        qs = r.comparison.get("quantiles") or {}
        parts = [
            f"{k} {v['now']:.4g} (was {v['previous']:.4g})"
            for k, v in qs.items()
            if v.get("now") is not None and v.get("previous") is not None and k in ("p50", "p90", "p99")
        ]
        if parts:
            out.append("  scores " + ", ".join(parts))
        er = r.comparison.get("error_rate") or {}
        if er.get("now") is not None and er.get("previous") is not None:
            out.append(f"  error rate {er['now']:.1%} (was {er['previous']:.1%})")
    elif not r.passes:
        out.append("  no images under this prefix" if not r.listed else "  nothing new to score")
    if r.report_uri:
        out.append(f"  review: {r.report_uri}/index.html")
    return "\n".join(out)


def exit_code(results: Sequence[NightResult], fail_on_drift: bool) -> int:
    """0 all nights done; 1 a night failed; 3 a drift warning (with --fail-on-drift)."""
    if any(r.status == "failed" for r in results):
        return 1
    if fail_on_drift and any(r.comparison and r.comparison.get("warning") for r in results):
        return 3
    return 0
