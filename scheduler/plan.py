"""Planning a scoring run: one set of rules for the distributed path and `--single-process`.

A run's plan lives in its report prefix: `listing.parquet` (the snapshot of the input listing the
batches are cut from) and `run.json` (run id, mode, model, batch size), written last. Planning has
two steps so that a run that never starts leaves nothing behind:

    prepare_plan  checks the report prefix and lists the input (or re-reads the snapshot of a run
                  being resumed); it writes nothing.
    commit_plan   writes the listing snapshot, then `run.json`. Callers commit only after every
                  service the run needs (the store, Redis, Ray) has answered, so a run that fails
                  to start does not claim the report prefix.

Rules (the same messages in both modes):
- an input without images (missing or empty) is refused;
- a report prefix that holds another run, or report data without a plan (parts or a summary left
  by something else), is refused; the same run id resumes the run, whichever mode started it;
- a resumed run keeps its listing snapshot and batch size, so it cuts the same batches;
- every file under the input is planned or counted as skipped with its reason (`run.json`'s
  `skipped`, copied into the summary); an image that is a symlink leading outside the input is
  planned, and its row is an error ("symlink outside the input").
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from patchaudit.errors import PatchauditError
from patchaudit.queue.messages import BatchMessage
from patchaudit.store import reports
from patchaudit.store.names import SKIP_SYMLINK_OUTSIDE
from patchaudit.store.objects import ObjectInfo, ObjectStore

RUN_KEY = "run.json"
MODES = ("distributed", "single-process")


class RunError(PatchauditError):
    """The run cannot start or finish (conflicting report prefix, no images, no workers left, ...)."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class Plan:
    run_id: str
    infos: list[ObjectInfo]
    batches: list[BatchMessage]
    resumed: bool  # the report prefix already held this run's plan
    complete: bool  # ... and its report is complete (`_SUCCESS`): nothing is left to do
    meta: dict[str, Any] = field(default_factory=dict)  # run.json's content


def _read_meta(report: ObjectStore) -> dict[str, Any] | None:
    if not report.exists(RUN_KEY):
        return None
    try:
        meta = json.loads(report.read_bytes(RUN_KEY))
    except ValueError as exc:
        raise RunError(f"{report.uri_for(RUN_KEY)} is not valid JSON ({exc}); use another --report") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("run_id"), str):
        raise RunError(f"{report.uri_for(RUN_KEY)} does not describe a run; use another --report")
    return meta


def _refuse_other(report: ObjectStore, holder: str, run_id: str | None = None) -> RunError:
    resume = f"pass --run-id {run_id} to resume it" if run_id else "remove it"
    return RunError(f"report prefix {report.uri} already holds {holder}; {resume}, or use another --report")


def _cut(run_id: str, infos: list[ObjectInfo], batch_size: int) -> list[BatchMessage]:
    keys = [i.key for i in infos]
    return [
        BatchMessage(run_id, f"b{n:06d}", tuple(keys[s : s + batch_size]))
        for n, s in enumerate(range(0, len(keys), batch_size))
    ]


def _with_outside_links(
    src: ObjectStore, infos: list[ObjectInfo], skipped: list[tuple[str, str]], extensions: tuple[str, ...]
) -> list[ObjectInfo]:
    """Images that are symlinks leading outside the input are planned anyway: reading them is refused,
    so each becomes an error row ("symlink outside the input") instead of silently missing."""
    links = [k for k, why in skipped if why == SKIP_SYMLINK_OUTSIDE and k.lower().endswith(extensions)]
    if not links:
        return infos
    skipped[:] = [(k, why) for k, why in skipped if why != SKIP_SYMLINK_OUTSIDE or k not in links]
    return sorted(infos + [ObjectInfo(k, 0, "", src.uri_for(k)) for k in links], key=lambda i: i.key)


def _count(skipped: list[tuple[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, why in skipped:
        out[why] = out.get(why, 0) + 1
    return dict(sorted(out.items()))


def list_input(src: ObjectStore) -> tuple[list[ObjectInfo], list[tuple[str, str]]]:
    """What a run plans from `src`: its images, sorted by key, and the skipped files as (key, reason).
    The audit lists a night with it too, so it plans exactly what a plain run would."""
    from patchaudit.workers.datasets import IMAGE_EXTENSIONS

    skipped: list[tuple[str, str]] = []
    infos = list(src.list(extensions=IMAGE_EXTENSIONS, on_skip=lambda key, why: skipped.append((key, why))))
    return _with_outside_links(src, infos, skipped, IMAGE_EXTENSIONS), skipped


def prepare_plan(
    report: ObjectStore,
    src: ObjectStore,
    run_id: str,
    batch_size: int,
    model_id: str,
    model_uri: str,
    mode: str,
    listing: Sequence[ObjectInfo] | None = None,
) -> Plan:
    """Check the report prefix and list the input (or re-read the run's snapshot). Writes nothing.

    `listing`: plan only these objects of `src` (e.g. an audit's unscored images) instead of listing
    it; a resumed run ignores it and re-reads its snapshot.
    """
    from patchaudit.workers.datasets import IMAGE_EXTENSIONS

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    meta = _read_meta(report)
    if meta is not None:
        if meta["run_id"] != run_id:
            raise _refuse_other(report, f"run {meta['run_id']!r}", meta["run_id"])
        if meta.get("model_id") != model_id:
            raise RunError(f"run {run_id} was planned with model {meta.get('model_id')}, not {model_id}")
        infos = reports.read_listing(report)
        batches = _cut(run_id, infos, int(meta["batch_size"]))
        return Plan(run_id, infos, batches, resumed=True, complete=reports.is_complete(report), meta=meta)
    if reports.list_parts(report) or report.exists(reports.SUMMARY_KEY):
        raise _refuse_other(report, "report parts of another run (no run.json)")
    skipped: list[tuple[str, str]] = []
    if listing is None:
        infos, skipped = list_input(src)
    else:
        infos = list(listing)
    if not infos:
        raise RunError(f"no images found under {src.uri} (missing or empty; extensions: {', '.join(IMAGE_EXTENSIONS)})")
    meta = {
        "run_id": run_id,
        "mode": mode,
        "input_uri": src.uri,
        "model_uri": model_uri,
        "model_id": model_id,
        "batch_size": batch_size,
        "images": len(infos),
        "subset": listing is not None,
        "skipped": _count(skipped),
        "skipped_examples": [{"key": k, "reason": why} for k, why in skipped[:20]],
    }
    return Plan(run_id, infos, _cut(run_id, infos, batch_size), resumed=False, complete=False, meta=meta)


def commit_plan(report: ObjectStore, plan: Plan) -> None:
    """Write a new plan into the report prefix: the listing snapshot, then `run.json` (last: the plan is
    complete). A resumed plan is already there; nothing is written."""
    if plan.resumed:
        return
    reports.write_listing(report, plan.infos)
    meta = {**plan.meta, "planned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report.write_bytes(RUN_KEY, json.dumps(meta, indent=2).encode())


def finished_summary(report: ObjectStore, run_id: str) -> dict[str, Any] | None:
    """The summary of run `run_id` if its report is already complete, else None.

    Re-running a finished run changes nothing: it returns the existing summary (timings included)
    marked `already_complete`, instead of rewriting it with the time of a run that did no work.
    """
    meta = _read_meta(report)
    if meta is None or meta["run_id"] != run_id or not reports.is_complete(report):
        return None
    return {"report_uri": report.uri, **reports.read_summary(report), "already_complete": True}
