"""Finishing a run in bounded memory: compact, check exactly-once, summarize, review page, success.

Nothing here holds the report's rows or the listing: the check walks the report one batch at a time
beside the listing snapshot, the summary reads the report in pieces (scheduler.summary).

    1. compact the parts into large files for the readers (store.compaction; the parts stay);
    2. check that every listed image is a row exactly once: batch n's rows are exactly the images
       of listing rows [n*B, (n+1)*B), and every planned batch has its rows;
    3. summary.json, the review page, then `_SUCCESS` (last).
"""

from __future__ import annotations

import logging
from typing import Any

from patchaudit.scheduler.plan import Plan, RunError, batch_number
from patchaudit.scheduler.summary import SUMMARY_COLUMNS, summarize_chunks
from patchaudit.store import compaction, reports
from patchaudit.store import listing as listings
from patchaudit.store.objects import ObjectStore

log = logging.getLogger(__name__)


def check_complete(report: ObjectStore, plan: Plan) -> int:
    """Raise RunError unless every listed image is a report row exactly once; returns the rows."""
    bs, seen, rows = plan.batch_size, bytearray(plan.n_batches), 0
    with plan.listing_path(report) as path:
        slices = listings.ListingSlices(path, report.uri_for(reports.LISTING_KEY))
        for batch_id, table in reports.iter_batches(report, columns=["image_uri"]):
            n = batch_number(batch_id)
            if n is None or n >= plan.n_batches:
                raise RunError(
                    f"report holds part {reports.part_key(batch_id)} of a batch the run did not plan; "
                    f"its rows are not images of this run's listing"
                )
            got = sorted(table.column(0).to_pylist())
            want = sorted(i.uri for i in slices.slice(n * bs, bs))
            rows += len(got)
            if got != want:
                dup = sorted({u for a, u in zip(got, got[1:]) if a == u})
                if dup:  # parts are per batch id and batches are disjoint: a bug, never paper over it
                    raise RunError(f"report holds {len(dup)} image(s) more than once, e.g. {dup[:3]}")
                extra = sorted(set(got) - set(want))
                if extra:
                    raise RunError(
                        f"part {reports.part_key(batch_id)} holds {len(extra)} row(s) of images outside its "
                        f"batch, e.g. {extra[:3]}"
                    )
                lost = sorted(set(want) - set(got))
                raise RunError(
                    f"{len(lost)} listed image(s) have no report row yet (e.g. {lost[0]}); "
                    f"re-run with --run-id {plan.run_id} to finish"
                )
            seen[n] = 1
        if seen.count(0):
            first = seen.index(0)
            missing = sum(min(bs, plan.images - n * bs) for n in range(plan.n_batches) if not seen[n])
            example = slices.slice(first * bs, 1)[0].key
            raise RunError(
                f"{missing} listed image(s) have no report row yet (e.g. {example}); "
                f"re-run with --run-id {plan.run_id} to finish"
            )
    return rows


def finish_report(
    report: ObjectStore,
    plan: Plan,
    *,
    model_id: str,
    threshold: float,
    top_k: int,
    seconds: float,
    extra: dict[str, Any],
    images_now: int | None,
) -> dict[str, Any]:
    """Compact, check, summarize and mark the report complete; returns the summary."""
    compaction.compact(report)
    check_complete(report, plan)
    summary = summarize_chunks(
        reports.iter_tables(report, columns=SUMMARY_COLUMNS),
        run_id=plan.run_id,
        model_id=model_id,
        threshold=threshold,
        top_k=top_k,
        seconds=seconds,
        n_listed=plan.images,
        extra={**extra, "resumed": plan.resumed, "batches": plan.n_batches, "skipped": plan.meta.get("skipped", {})},
        images_now=images_now,
    )
    reports.write_summary(report, summary)
    write_review_page_safely(report, summary)
    return {"report_uri": report.uri, **summary}


def write_review_page_safely(report: ObjectStore, summary: dict[str, Any]) -> None:
    """The review page of a finished report; a failure to draw it is logged, never fails the run."""
    from patchaudit.review.page import write_review_page

    try:
        write_review_page(report, summary=summary)
    except Exception as exc:  # noqa: BLE001 - the report itself is complete and correct
        log.warning("could not write the review page of %s: %s: %s", report.uri, type(exc).__name__, exc)
