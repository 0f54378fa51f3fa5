"""The run summary written last into a report prefix: counts, score distribution, top-K, errors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SUMMARY_COLUMNS = ["image_uri", "score", "is_anomalous", "heatmap_uri", "error"]
EXAMPLES = 20


def summarize(table: pa.Table, **kwargs: Any) -> dict[str, Any]:
    """The summary of one report table (see `summarize_chunks`)."""
    return summarize_chunks([table], **kwargs)


def _smallest(table: pa.Table, k: int, sort_keys: list[tuple[str, str]]) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=sort_keys)[:k]) if table.num_rows else table


def summarize_chunks(
    chunks: Iterable[pa.Table],
    *,
    run_id: str,
    model_id: str,
    threshold: float,
    top_k: int,
    seconds: float,
    n_listed: int,
    extra: dict[str, Any] | None = None,
    images_now: int | None = None,
) -> dict[str, Any]:
    """The summary of a report read in pieces (any order): memory holds the scores (8 bytes an image,
    for exact quantiles), the top-K and the first error examples, never the rows.

    `images_now`: images scored by this invocation (a resumed run scores only what was left);
    the rate is theirs over `seconds`. Default: every row."""
    n = n_scored = n_anomalous = 0
    scores: list[np.ndarray] = []
    top: pa.Table | None = None
    examples: pa.Table | None = None
    reasons: dict[str, int] = {}
    top_keys = [("score", "descending"), ("image_uri", "ascending")]
    for chunk in chunks:
        table = chunk.select(SUMMARY_COLUMNS)
        n += table.num_rows
        scored = table.filter(pc.is_null(table["error"]))
        errors = table.filter(pc.is_valid(table["error"]))
        if scored.num_rows:
            n_scored += scored.num_rows
            scores.append(scored["score"].to_numpy(zero_copy_only=False))
            n_anomalous += int(pc.sum(scored["is_anomalous"].cast(pa.int64())).as_py() or 0)
            cand = _smallest(scored.select(["image_uri", "score", "heatmap_uri"]), top_k, top_keys)
            top = cand if top is None else _smallest(pa.concat_tables([top, cand]), top_k, top_keys)
        if errors.num_rows:
            for e in errors["error"].to_pylist():
                reason = e.split(":", 1)[0]
                reasons[reason] = reasons.get(reason, 0) + 1
            ex = _smallest(errors.select(["image_uri", "error"]), EXAMPLES, [("image_uri", "ascending")])
            examples = (
                ex
                if examples is None
                else _smallest(pa.concat_tables([examples, ex]), EXAMPLES, [("image_uri", "ascending")])
            )
    quantiles = {}
    if scores:
        values = np.concatenate(scores)
        del scores
        for q in (0.0, 0.5, 0.9, 0.99, 1.0):
            quantiles[f"p{int(q * 100)}"] = float(np.quantile(values, q))
        quantiles["mean"] = float(values.mean())
    now = n if images_now is None else images_now
    return {
        "run_id": run_id,
        "model_id": model_id,
        "threshold": threshold,
        "images_listed": n_listed,
        "rows": n,
        "scored": n_scored,
        "anomalous": n_anomalous,
        "errors": n - n_scored,
        "error_reasons": reasons,
        "error_examples": examples.to_pylist() if examples is not None else [],
        "score_distribution": quantiles,
        "top_anomalous": top.to_pylist() if top is not None else [],
        "seconds": seconds,
        "images_scored_now": now,
        "images_per_second": (now / seconds) if seconds > 0 else None,
        **(extra or {}),
    }
