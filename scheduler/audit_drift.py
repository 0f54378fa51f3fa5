"""Drift of an audit run against the line's previous run: flag rate, error rate, score quantiles.

Both sides are report summaries (scheduler.summary), so the comparison costs nothing at any scale.
A warning is raised when the flag rate moves by more than the line's bound (absolute, e.g. 0.05 =
5 percentage points) and both runs scored at least `min_images` images.
"""

from __future__ import annotations

from typing import Any

from patchaudit.scheduler.audit_spec import DriftSpec

QUANTILES = ("p50", "p90", "p99", "p100", "mean")


def _rate(num: Any, den: Any) -> float | None:
    return float(num) / float(den) if den else None


def rates(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    """(flag rate over scored images, error rate over rows) of a summary."""
    return (
        _rate(summary.get("anomalous", 0), summary.get("scored", 0)),
        _rate(summary.get("errors", 0), summary.get("rows", 0)),
    )


def _pair(now: float | None, prev: float | None) -> dict[str, float | None]:
    delta = now - prev if now is not None and prev is not None else None
    return {"now": now, "previous": prev, "delta": delta}


def compare(
    now: dict[str, Any], prev: dict[str, Any] | None, drift: DriftSpec, previous_ref: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The comparison document stored with the report (review/comparison.json) and printed by the audit."""
    if prev is None:
        return {
            "previous": None,
            "warning": False,
            "bound": drift.flag_rate_bound,
            "message": "first run of this line: nothing to compare with",
        }
    fr_now, er_now = rates(now)
    fr_prev, er_prev = rates(prev)
    flag_rate, error_rate = _pair(fr_now, fr_prev), _pair(er_now, er_prev)
    qn, qp = now.get("score_distribution") or {}, prev.get("score_distribution") or {}
    quantiles = {q: _pair(qn.get(q), qp.get(q)) for q in QUANTILES if q in qn or q in qp}
    enough = min(int(now.get("scored", 0)), int(prev.get("scored", 0))) >= drift.min_images
    delta = flag_rate["delta"]
    warning = bool(enough and delta is not None and abs(delta) > drift.flag_rate_bound)
    if delta is None:
        message = "no flag rate to compare (a run scored no image)"
    elif warning:
        message = (
            f"DRIFT: flag rate {fr_now:.1%} vs {fr_prev:.1%} in the previous run "
            f"({delta * 100:+.1f} pt, bound ±{drift.flag_rate_bound * 100:.1f} pt)"
        )
    elif not enough:
        message = (
            f"flag rate {fr_now:.1%} vs {fr_prev:.1%} ({delta * 100:+.1f} pt); too few images "
            f"(< {drift.min_images}) in one of the runs for a drift warning"
        )
    else:
        message = (
            f"flag rate {fr_now:.1%} vs {fr_prev:.1%} ({delta * 100:+.1f} pt), "
            f"within ±{drift.flag_rate_bound * 100:.1f} pt"
        )
    return {
        "previous": {**(previous_ref or {}), "run_id": prev.get("run_id"), "scored": prev.get("scored", 0)},
        "flag_rate": flag_rate,
        "error_rate": error_rate,
        "quantiles": quantiles,
        "bound": drift.flag_rate_bound,
        "warning": warning,
        "message": message,
    }
