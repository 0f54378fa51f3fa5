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

import heapq
import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from patchaudit.errors import PatchauditError
from patchaudit.queue.messages import BatchMessage
from patchaudit.store import listing as listings
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
    """A run's plan. The listing itself is never held in memory: a new plan's listing is a local
    spool until `commit_plan` uploads it as the report's snapshot; batches are cut from it on demand
    (`iter_batches`), batch n holding listing rows [n * batch_size, (n + 1) * batch_size)."""

    run_id: str
    images: int
    batch_size: int
    resumed: bool  # the report prefix already held this run's plan
    complete: bool  # ... and its report is complete (`_SUCCESS`): nothing is left to do
    meta: dict[str, Any] = field(default_factory=dict)  # run.json's content
    spool: listings.ListingSpool | None = None  # a new plan's listing, until committed

    @property
    def n_batches(self) -> int:
        return -(-self.images // self.batch_size)

    def batch_ids(self) -> list[str]:
        return [batch_id(n) for n in range(self.n_batches)]

    @contextmanager
    def listing_path(self, report: ObjectStore) -> Iterator[str]:
        """A local path of the plan's listing (its spool, or the report's snapshot)."""
        if self.spool is not None:
            self.spool.close()
            yield self.spool.path
        else:
            with listings.local_listing(report) as path:
                yield path

    def iter_batches(self, report: ObjectStore) -> Iterator[BatchMessage]:
        """The plan's batches in order, cut from its listing one row group at a time."""
        with self.listing_path(report) as path:
            yield from cut(self.run_id, listings.iter_keys(path, report.uri_for(reports.LISTING_KEY)), self.batch_size)


def batch_id(n: int) -> str:
    return f"b{n:06d}"


def batch_number(batch_id: str) -> int | None:
    """n of a planned batch id `b<n>` (None for anything else)."""
    m = _BATCH_RE.fullmatch(batch_id)
    return int(m[1]) if m else None


_BATCH_RE = re.compile(r"b(\d{6,})")


def cut(run_id: str, key_groups: Iterable[list[str]], batch_size: int) -> Iterator[BatchMessage]:
    """Batches of `batch_size` keys from keys arriving in groups (e.g. a snapshot's row groups)."""
    buf: list[str] = []
    n = 0
    for group in key_groups:
        buf.extend(group)
        start = 0
        while len(buf) - start >= batch_size:
            yield BatchMessage(run_id, batch_id(n), tuple(buf[start : start + batch_size]))
            n, start = n + 1, start + batch_size
        del buf[:start]
    if buf:
        yield BatchMessage(run_id, batch_id(n), tuple(buf))


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


def list_input(src: ObjectStore) -> tuple[list[ObjectInfo], list[tuple[str, str]]]:
    """What a run plans from `src`: its images, sorted by key, and the skipped files as (key, reason).
    The audit lists a night with it too, so it plans exactly what a plain run would."""
    from patchaudit.workers.datasets import IMAGE_EXTENSIONS

    skipped: list[tuple[str, str]] = []
    infos = list(src.list(extensions=IMAGE_EXTENSIONS, on_skip=lambda key, why: skipped.append((key, why))))
    return _with_outside_links(src, infos, skipped, IMAGE_EXTENSIONS), skipped


class _Skips:
    """Skipped files while listing: counts by reason and the first 20, and the images that are
    symlinks leading outside the input (planned anyway, see `_with_outside_links`)."""

    def __init__(self, extensions: tuple[str, ...] = ()) -> None:
        self.extensions = extensions
        self.counts: dict[str, int] = {}
        self.examples: list[tuple[str, str]] = []
        self.outside_links: list[str] = []

    def __call__(self, key: str, why: str) -> None:
        if why == SKIP_SYMLINK_OUTSIDE and key.lower().endswith(self.extensions):
            self.outside_links.append(key)
            return
        self.counts[why] = self.counts.get(why, 0) + 1
        if len(self.examples) < 20:
            self.examples.append((key, why))


def spool_input(src: ObjectStore, skips: _Skips) -> listings.ListingSpool:
    """List `src` into a local listing spool as it is listed (bounded memory), by the rules of
    `list_input`: sorted by key, outside symlinks to images planned, every other skip counted."""
    from patchaudit.workers.datasets import IMAGE_EXTENSIONS

    skips.extensions = IMAGE_EXTENSIONS
    out = listings.spool(src.list(extensions=IMAGE_EXTENSIONS, on_skip=skips))
    if not skips.outside_links:
        return out
    # Rare: merge the outside links into their sorted places, one more streaming pass.
    links = [ObjectInfo(k, 0, "", src.uri_for(k)) for k in sorted(skips.outside_links)]
    merged = listings.spool(heapq.merge(listings.iter_infos(out.path), links, key=lambda i: i.key))
    out.discard()
    return merged


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
        with listings.local_listing(report) as path:
            images = listings.count(path, report.uri_for(reports.LISTING_KEY))
        return Plan(
            run_id,
            images,
            int(meta["batch_size"]),
            resumed=True,
            complete=reports.is_complete(report),
            meta=meta,
        )
    if reports.list_parts(report) or report.exists(reports.SUMMARY_KEY):
        raise _refuse_other(report, "report parts of another run (no run.json)")
    skips = _Skips()
    if listing is None:
        spool = spool_input(src, skips)
    else:
        spool = listings.spool(listing)
    if not spool.count:
        spool.discard()
        raise RunError(f"no images found under {src.uri} (missing or empty; extensions: {', '.join(IMAGE_EXTENSIONS)})")
    meta = {
        "run_id": run_id,
        "mode": mode,
        "input_uri": src.uri,
        "model_uri": model_uri,
        "model_id": model_id,
        "batch_size": batch_size,
        "images": spool.count,
        "subset": listing is not None,
        "skipped": dict(sorted(skips.counts.items())),
        "skipped_examples": [{"key": k, "reason": why} for k, why in skips.examples],
    }
    return Plan(run_id, spool.count, batch_size, resumed=False, complete=False, meta=meta, spool=spool)


def commit_plan(report: ObjectStore, plan: Plan) -> None:
    """Write a new plan into the report prefix: the listing snapshot, then `run.json` (last: the plan is
    complete). A resumed plan is already there; nothing is written."""
    if plan.resumed:
        return
    assert plan.spool is not None  # a new plan always has its listing spooled
    plan.spool.commit(report, reports.LISTING_KEY)
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
