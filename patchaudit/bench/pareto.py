"""Pareto-optimal configurations and a recommendation rule (pure functions on plain rows).

A row is a mapping; objectives name its keys and a direction ("max" or "min"). Row A dominates row B
when A is at least as good on every objective and strictly better on one. A row with a missing
(None/NaN) objective value cannot be compared on that axis: it is never Pareto-optimal, and it
dominates nothing (a Gaussian AD row has no pixel metrics, so it is left out of a pixel-accuracy
front rather than scored as 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from patchaudit.errors import PatchauditError

DIRECTIONS = ("max", "min")


class ParetoError(PatchauditError, ValueError):
    """Bad objectives or rows (unknown direction, a value that is not a number)."""


def _value(row: Mapping[str, Any], key: str, i: int) -> float | None:
    v = row.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ParetoError(f"row #{i}: {key} must be a number or None, got {v!r}")
    return None if math.isnan(v) else float(v)


def _check_objectives(objectives: Sequence[tuple[str, str]]) -> None:
    if not objectives:
        raise ParetoError("need at least one objective (key, 'max'|'min')")
    for obj in objectives:
        if len(obj) != 2 or obj[1] not in DIRECTIONS:
            raise ParetoError(f"objective {obj!r} must be (key, direction) with direction one of {DIRECTIONS}")


def pareto_mask(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> list[bool]:
    """For each row, True when no other row dominates it (rows with a missing objective: False).

    Equal rows do not dominate each other, so duplicates of an optimal row are all optimal.
    O(n^2) in the number of rows: a benchmark grid has tens of rows.
    """
    _check_objectives(objectives)
    # as "higher is better" vectors; None where a value is missing
    vecs: list[tuple[float, ...] | None] = []
    for i, row in enumerate(rows):
        vals = [_value(row, key, i) for key, _ in objectives]
        known = [v for v in vals if v is not None]
        if len(known) < len(vals):
            vecs.append(None)
            continue
        vecs.append(tuple(v if d == "max" else -v for v, (_, d) in zip(known, objectives)))
    out = []
    for i, a in enumerate(vecs):
        if a is None:
            out.append(False)
            continue
        dominated = any(
            b is not None and all(y >= x for x, y in zip(a, b)) and any(y > x for x, y in zip(a, b))
            for j, b in enumerate(vecs)
            if j != i
        )
        out.append(not dominated)
    return out


@dataclass(frozen=True)
class Recommendation:
    index: int  # position of the chosen row in the rows given
    reason: str  # one sentence a reader can check against the table


def recommend(
    rows: Sequence[Mapping[str, Any]],
    optimal: Sequence[bool],
    accuracy: str,
    speed: str,
    size: str,
    tolerance: float = 0.01,
    names: Mapping[str, str] | None = None,
) -> Recommendation | None:
    """Among the Pareto-optimal rows, the fastest whose accuracy is within `tolerance` of the best one.

    Ties on speed go to the smaller model, then to the more accurate row. None when no row is
    optimal (e.g. every row lacks the accuracy value). `names` gives display names for the keys
    in the reason (default: the keys themselves).
    """
    if len(optimal) != len(rows):
        raise ParetoError(f"got {len(rows)} rows but {len(optimal)} Pareto flags")
    if not tolerance >= 0:
        raise ParetoError(f"tolerance must be >= 0, got {tolerance!r}")
    cand = [i for i, ok in enumerate(optimal) if ok]
    if not cand:
        return None
    acc: dict[int, float] = {}
    spd: dict[int, float] = {}
    siz: dict[int, float] = {}
    for i in cand:
        a, s, z = (_value(rows[i], key, i) for key in (accuracy, speed, size))
        if a is None or s is None or z is None:
            raise ParetoError(f"row #{i} is marked optimal but lacks {accuracy}, {speed} or {size}")
        acc[i], spd[i], siz[i] = a, s, z
    best = max(acc.values())
    near = [i for i in cand if acc[i] >= best - tolerance - 1e-12]  # float slack
    pick = max(near, key=lambda i: (spd[i], -siz[i], acc[i]))
    name = {k: k for k in (accuracy, speed, size)} | dict(names or {})
    if acc[pick] == best:
        how = "the most accurate Pareto-optimal configuration"
        if len(near) > 1:
            how += f" and the fastest of the {len(near)} within {tolerance:g} of it"
    else:
        how = (
            f"{best - acc[pick]:.4f} below the best {name[accuracy]} {best:.4f} "
            f"(within the tolerance {tolerance:g}), and the fastest of the {len(near)} Pareto-optimal "
            "configurations that close"
        )
    reason = f"{name[accuracy]} {acc[pick]:.4f}, {spd[pick]:.3g} {name[speed]}, {siz[pick]:.3g} {name[size]}: {how}"
    return Recommendation(pick, reason)
