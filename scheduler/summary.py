"""The run summary written last into a report prefix: counts, score distribution, top-K, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def summarize(
    table: pa.Table,
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
    """`images_now`: images scored by this invocation (a resumed run scores only what was left);
    the rate is theirs over `seconds`. Default: every row."""
    scored = table.filter(pc.is_null(table["error"]))
    errors = table.filter(pc.is_valid(table["error"]))
    scores = scored["score"].to_numpy(zero_copy_only=False) if scored.num_rows else None
    quantiles = {}
    if scores is not None and len(scores):
        for q in (0.0, 0.5, 0.9, 0.99, 1.0):
            quantiles[f"p{int(q * 100)}"] = float(np.quantile(scores, q))
        quantiles["mean"] = float(scores.mean())
    top = []
    if scored.num_rows:
        idx = pc.sort_indices(scored, sort_keys=[("score", "descending"), ("image_uri", "ascending")])
        for row in scored.take(idx[:top_k]).select(["image_uri", "score", "heatmap_uri"]).to_pylist():
            top.append(row)
    reasons: dict[str, int] = {}
    for e in errors["error"].to_pylist():
        reason = e.split(":", 1)[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    n = table.num_rows
    return {
        "run_id": run_id,
        "model_id": model_id,
        "threshold": threshold,
        "images_listed": n_listed,
        "rows": n,
        "scored": scored.num_rows,
        "anomalous": int(pc.sum(scored["is_anomalous"].cast(pa.int64())).as_py() or 0) if scored.num_rows else 0,
        "errors": errors.num_rows,
        "error_reasons": reasons,
        "error_examples": errors.select(["image_uri", "error"]).slice(0, 20).to_pylist(),
        "score_distribution": quantiles,
        "top_anomalous": top,
        "seconds": seconds,
        "images_scored_now": n if images_now is None else images_now,
        "images_per_second": ((n if images_now is None else images_now) / seconds) if seconds > 0 else None,
        **(extra or {}),
    }
