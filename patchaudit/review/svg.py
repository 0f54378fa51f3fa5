"""Small inline SVG charts for the review page: no JavaScript, no external files, no plotting library."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import numpy as np

OK_COLOR = "#6b8fb3"
FLAG_COLOR = "#d9534f"
PREV_COLOR = "#b7b7b7"
AXIS_COLOR = "#555"


def _fmt(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000 or a < 0.01:
        return f"{v:.2e}"
    return f"{v:.3g}"


def histogram_svg(
    edges: np.ndarray,
    below: np.ndarray,
    above: np.ndarray,
    threshold: float | None,
    width: int = 760,
    height: int = 240,
) -> str:
    """Stacked score histogram (under the threshold / flagged) with the threshold as a dashed line."""
    left, right, top, bottom = 48, 12, 14, 36
    pw, ph = width - left - right, height - top - bottom
    totals = below + above
    ymax = max(1, int(totals.max()))
    lo, hi = float(edges[0]), float(edges[-1])

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    def h(n: float) -> float:
        return n / ymax * ph

    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="score histogram">'
        )
    ]
    for i in range(len(below)):
        x0, x1 = x(edges[i]), x(edges[i + 1])
        w = max(0.5, x1 - x0 - 1)
        hb, ha = h(below[i]), h(above[i])
        tip = f"{_fmt(edges[i])} to {_fmt(edges[i + 1])}: {int(below[i])} under, {int(above[i])} flagged"
        if below[i]:
            parts.append(
                f'<rect x="{x0:.1f}" y="{top + ph - hb:.1f}" width="{w:.1f}" height="{hb:.1f}" '
                f'fill="{OK_COLOR}"><title>{tip}</title></rect>'
            )
        if above[i]:
            parts.append(
                f'<rect x="{x0:.1f}" y="{top + ph - hb - ha:.1f}" width="{w:.1f}" height="{ha:.1f}" '
                f'fill="{FLAG_COLOR}"><title>{tip}</title></rect>'
            )
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="{AXIS_COLOR}"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="{AXIS_COLOR}"/>')
    for t in np.linspace(lo, hi, 6):
        parts.append(f'<text x="{x(t):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{_fmt(t)}</text>')
    for n in (0, ymax // 2, ymax):
        parts.append(f'<text x="{left - 6}" y="{top + ph - h(n) + 4:.1f}" font-size="11" text-anchor="end">{n}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" font-size="11" text-anchor="middle">score</text>')
    if threshold is not None:
        tx = x(threshold)
        parts.append(
            f'<line x1="{tx:.1f}" y1="{top - 4}" x2="{tx:.1f}" y2="{top + ph}" stroke="#222" '
            f'stroke-width="1.5" stroke-dasharray="5,3"/>'
        )
        anchor = "end" if tx > left + pw * 0.8 else "start"
        dx = -4 if anchor == "end" else 4
        parts.append(
            f'<text x="{tx + dx:.1f}" y="{top + 8}" font-size="11" text-anchor="{anchor}">'
            f"threshold {_fmt(threshold)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def rate_bars_svg(
    labels: Sequence[str],
    rates: Sequence[float],
    notes: Sequence[str],
    previous: Sequence[float | None] | None = None,
    width: int = 760,
) -> str:
    """Horizontal bars of a rate in [0, 1] per label (e.g. flag rate per folder), with a note each;
    `previous` adds a thin grey bar under each (the same rate in the previous run)."""
    row = 22 if previous is None else 30
    label_w, note_w = 260, 170
    pw = width - label_w - note_w - 10
    vmax = max([*rates, *(p for p in (previous or []) if p is not None), 1e-9])
    vmax = min(1.0, vmax * 1.1) if vmax < 0.9 else 1.0
    height = row * len(labels) + 24
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="rates">'
        )
    ]
    for i, (label, rate, note) in enumerate(zip(labels, rates, notes)):
        y = 4 + i * row
        short = label if len(label) <= 40 else "…" + label[-39:]
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 13}" font-size="12" text-anchor="end">'
            f"<title>{escape(label)}</title>{escape(short)}</text>"
        )
        w = rate / vmax * pw
        parts.append(
            f'<rect x="{label_w}" y="{y + 2}" width="{max(w, 0.5):.1f}" height="14" fill="{FLAG_COLOR}">'
            f"<title>{escape(label)}: {rate:.1%}</title></rect>"
        )
        before = previous[i] if previous is not None else None
        if before is not None:
            pw_i = before / vmax * pw
            parts.append(
                f'<rect x="{label_w}" y="{y + 18}" width="{max(pw_i, 0.5):.1f}" height="6" '
                f'fill="{PREV_COLOR}"><title>previous run: {before:.1%}</title></rect>'
            )
        parts.append(f'<text x="{label_w + pw + 8}" y="{y + 13}" font-size="12">{escape(note)}</text>')
    ay = height - 16
    parts.append(f'<line x1="{label_w}" y1="{ay}" x2="{label_w + pw}" y2="{ay}" stroke="{AXIS_COLOR}"/>')
    for t in np.linspace(0, vmax, 5):
        parts.append(
            f'<text x="{label_w + t / vmax * pw:.1f}" y="{ay + 13}" font-size="10" text-anchor="middle">{t:.0%}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def quantile_compare_svg(
    names: Sequence[str], now: Sequence[float], prev: Sequence[float], width: int = 760, height: int = 124
) -> str:
    """Score quantiles of this run (red dots) and the previous run (grey dots) on one axis each."""
    left, right = 60, 20
    pw = width - left - right
    values = [*now, *prev]
    lo, hi = min(values), max(values)
    if hi <= lo:
        hi = lo + 1.0

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="score quantiles">'
        )
    ]
    for y, label, vals, color in ((34, "previous", prev, PREV_COLOR), (80, "this run", now, FLAG_COLOR)):
        parts.append(f'<text x="{left - 8}" y="{y + 4}" font-size="12" text-anchor="end">{label}</text>')
        parts.append(
            f'<line x1="{x(min(vals)):.1f}" y1="{y}" x2="{x(max(vals)):.1f}" y2="{y}" stroke="{color}" '
            f'stroke-width="2"/>'
        )
        last_x, lift = -1e9, 0
        for name, v in sorted(zip(names, vals), key=lambda nv: nv[1]):
            parts.append(
                f'<circle cx="{x(v):.1f}" cy="{y}" r="5" fill="{color}"><title>{name}: {_fmt(v)}</title></circle>'
            )
            lift = 10 - lift if x(v) - last_x < 30 else 0  # stagger labels of close quantiles
            last_x = x(v)
            parts.append(f'<text x="{x(v):.1f}" y="{y - 9 - lift}" font-size="10" text-anchor="middle">{name}</text>')
    for t in np.linspace(lo, hi, 6):
        parts.append(f'<text x="{x(t):.1f}" y="{height - 8}" font-size="10" text-anchor="middle">{_fmt(t)}</text>')
    parts.append("</svg>")
    return "".join(parts)
