"""The review page of a report: one self-contained `index.html` at the report's root.

Inline CSS and SVG, no scripts, no external files; images are relative links to the report's own
heatmaps (and to the input images when they sit in the same bucket or file system), so the page
works opened from a folder and served from an S3 static website.

Other commands add sections (a diff, cluster galleries...) without touching this module:
`add_review_section(store, name, title, html)` stores `review/sections/<name>.json` and redraws the
page; every later redraw (e.g. the audit adding its comparison) keeps them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from html import escape
from typing import Any

import pyarrow as pa

from patchaudit.review import svg
from patchaudit.review.data import SECTIONS_PREFIX, ReviewData, collect
from patchaudit.store.objects import ObjectStore

PAGE_KEY = "index.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px}.meta code{font-size:12px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 16px;min-width:110px}
.card .v{font-size:24px;font-weight:600}.card .k{font-size:12px;color:#666}
.card.flag .v{color:#d9534f}.card.err .v{color:#a15c00}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:10px 14px;border-radius:6px;margin:10px 0}
.okmsg{background:#eef6ee;border:1px solid #9c9;padding:8px 14px;border-radius:6px;margin:10px 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:14px}
.tile{border:1px solid #ddd;border-radius:6px;overflow:hidden;background:#fafafa}
.tile img{width:100%;height:230px;object-fit:contain;display:block;background:#111}.tile .cap{font-size:12px;padding:6px 8px;word-break:break-all}
.tile .noimg{height:120px;display:flex;align-items:center;justify-content:center;color:#888;font-size:12px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px -1px 12px}
.muted{color:#888;font-size:12px}
"""


def _n(v: int) -> str:
    return f"{v:,}"


def _f(v: Any, fmt: str = ".4g") -> str:
    return "n/a" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _header(d: ReviewData) -> str:
    s = d.summary
    title = s.get("title") or f"Review of run {s.get('run_id', '?')}"
    meta = [f"report <code>{escape(d.report_uri)}</code>"]
    if s.get("input_uri"):
        meta.append(f"input <code>{escape(str(s['input_uri']))}</code>")
    if s.get("model_id"):
        meta.append(f"model <code>{escape(str(s['model_id']))}</code>")
    if s.get("mode"):
        meta.append(escape(str(s["mode"])))
    cards = [
        ("listed", _n(int(s.get("images_listed", d.rows))), ""),
        ("scored", _n(d.scored), ""),
        ("flagged", _n(d.flagged), "flag"),
        ("flag rate", _pct(d.flag_rate), "flag"),
        ("errors", _n(d.errors), "err" if d.errors else ""),
        ("threshold", _f(d.threshold), ""),
    ]
    if s.get("images_per_second"):
        cards.append(("images/s", f"{s['images_per_second']:.1f}", ""))
    cards_html = "".join(
        f'<div class="card {c}"><div class="v">{v}</div><div class="k">{k}</div></div>' for k, v, c in cards
    )
    return f"<h1>{escape(title)}</h1><div class='meta'>{' · '.join(meta)}</div><div class='cards'>{cards_html}</div>"


def _histogram(d: ReviewData) -> str:
    if d.histogram is None:
        return "<h2>Scores</h2><p class='muted'>No image was scored.</p>"
    h = d.histogram
    legend = (
        f"<div class='legend muted'><span style='background:{svg.OK_COLOR}'></span>under the threshold"
        f"<span style='background:{svg.FLAG_COLOR}'></span>flagged (score at or above the threshold)</div>"
    )
    q = d.summary.get("score_distribution") or {}
    order = ["p0", "p50", "p90", "p99", "p100", "mean"]
    qtext = " · ".join(f"{k} {_f(q[k])}" for k in sorted(q, key=lambda k: order.index(k) if k in order else 99))
    return (
        f"<h2>Scores</h2>{svg.histogram_svg(h.edges, h.below, h.above, d.threshold)}{legend}"
        f"<p class='muted'>{escape(qtext)}</p>"
    )


def _comparison(d: ReviewData) -> str:
    c = d.comparison
    if not c:
        return ""
    prev = c.get("previous") or {}
    out = ["<h2>Compared with the previous run of the line</h2>"]
    if not prev:
        out.append("<p class='muted'>This is the line's first run: nothing to compare with.</p>")
        return "".join(out)
    link = prev.get("report_href")
    name = escape(str(prev.get("pass", prev.get("run_id", "previous run"))))
    out.append(
        f"<p>Previous run: {f'<a href={json.dumps(link)}>{name}</a>' if link else name} "
        f"({_n(int(prev.get('scored', 0)))} scored).</p>"
    )
    msg = escape(str(c.get("message", "")))
    out.append(f"<div class='{'warn' if c.get('warning') else 'okmsg'}'>{msg}</div>")
    fr, er = c.get("flag_rate") or {}, c.get("error_rate") or {}
    labels, rates, notes, previous = [], [], [], []
    for label, m in (("flag rate", fr), ("error rate", er)):
        if m.get("now") is not None:
            labels.append(label)
            rates.append(float(m["now"]))
            previous.append(m.get("previous"))
            delta = m.get("delta")
            notes.append(
                f"{_pct(m['now'])} (was {_pct(m.get('previous'))}"
                + (f", {delta * 100:+.1f} pt)" if delta is not None else ")")
            )
    if labels:
        out.append(svg.rate_bars_svg(labels, rates, notes, previous))
        out.append(
            f"<div class='legend muted'><span style='background:{svg.FLAG_COLOR}'></span>this run"
            f"<span style='background:{svg.PREV_COLOR}'></span>previous run</div>"
        )
    qs = c.get("quantiles") or {}
    names = [k for k, v in qs.items() if v.get("now") is not None and v.get("previous") is not None]
    if names:
        out.append(svg.quantile_compare_svg(names, [qs[k]["now"] for k in names], [qs[k]["previous"] for k in names]))
        rows = "".join(
            f"<tr><td>{escape(k)}</td><td class='n'>{_f(qs[k]['previous'])}</td>"
            f"<td class='n'>{_f(qs[k]['now'])}</td></tr>"
            for k in names
        )
        out.append(f"<table><tr><th>score quantile</th><th>previous</th><th>this run</th></tr>{rows}</table>")
    return "".join(out)


def _folders(d: ReviewData) -> str:
    if not d.folders:
        return ""
    labels = [f.name for f in d.folders]
    rates = [f.flag_rate for f in d.folders]
    notes = [
        f"{f.flagged}/{f.images - f.errors} flagged" + (f", {f.errors} error(s)" if f.errors else "") for f in d.folders
    ]
    more = f"<p class='muted'>{d.folders_more} smaller folder(s) not shown.</p>" if d.folders_more else ""
    return f"<h2>Flag rate per folder</h2>{svg.rate_bars_svg(labels, rates, notes)}{more}"


def _gallery(d: ReviewData) -> str:
    if not d.top:
        return "<h2>Top flagged images</h2><p class='muted'>No image was flagged.</p>"
    tiles = []
    for t in d.top:
        if t["heatmap_href"]:
            img = (
                f"<a href={json.dumps(t['heatmap_href'])}><img loading='lazy' alt='heatmap overlay of "
                f"{escape(t['name'])}' src={json.dumps(t['heatmap_href'])}></a>"
            )
        else:
            img = "<div class='noimg'>no heatmap in this report</div>"
        name = escape(t["name"])
        if t["image_href"]:
            name = f"<a href={json.dumps(t['image_href'])}>{name}</a>"
        area = f" · area {_pct(t['area'])}" if t.get("area") is not None else ""
        tiles.append(f"<div class='tile'>{img}<div class='cap'><b>{_f(t['score'])}</b>{area}<br>{name}</div></div>")
    note = "" if d.flagged <= len(d.top) else f"<p class='muted'>The {len(d.top)} highest of {_n(d.flagged)}.</p>"
    return f"<h2>Top flagged images</h2>{note}<div class='gallery'>{''.join(tiles)}</div>"


def _errors(d: ReviewData) -> str:
    if not d.errors:
        return "<h2>Errors</h2><p class='muted'>None: every listed image was scored.</p>"
    reasons = "".join(f"<tr><td>{escape(r)}</td><td class='n'>{_n(n)}</td></tr>" for r, n in d.error_reasons)
    examples = "".join(
        f"<tr><td>{escape(e['image_uri'])}</td><td>{escape(e['error'])}</td>"
        f"<td class='n'>{e['attempt']}</td><td>{escape(e['worker'])}</td></tr>"
        for e in d.error_examples
    )
    more = (
        f"<p class='muted'>First {len(d.error_examples)} of {_n(d.errors)}.</p>"
        if d.errors > len(d.error_examples)
        else ""
    )
    return (
        f"<h2>Errors</h2><table><tr><th>reason</th><th>images</th></tr>{reasons}</table><br>"
        f"<table><tr><th>image</th><th>error</th><th>attempt</th><th>worker</th></tr>{examples}</table>{more}"
    )


def render(d: ReviewData, extra_sections: Sequence[dict[str, str]] = ()) -> str:
    sections = [*d.sections, *extra_sections]
    extra = "".join(f"<h2>{escape(s['title'])}</h2>{s['html']}" for s in sections)
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    title = escape(str(d.summary.get("title") or f"patchaudit review {d.summary.get('run_id', '')}"))
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>"
        f"{_header(d)}{_comparison(d)}{_histogram(d)}{_folders(d)}{_gallery(d)}{_errors(d)}{extra}"
        f"<p class='muted'>Written by patchaudit, {made}. Links are relative to this page.</p></body></html>"
    )


def write_review_page(
    store: ObjectStore,
    *,
    table: pa.Table | None = None,
    summary: dict[str, Any] | None = None,
    extra_sections: Sequence[dict[str, str]] = (),
) -> str:
    """Draw the report's `index.html` from its files (plus `extra_sections`: dicts with title and html,
    shown once, not stored); returns the page's URI."""
    data = collect(store, table, summary)
    return store.write_bytes(PAGE_KEY, render(data, extra_sections).encode("utf-8")).uri


def add_review_section(store: ObjectStore, name: str, title: str, html: str, redraw: bool = True) -> str | None:
    """Store a section (kept by every later redraw) and redraw the page; `html` is trusted markup."""
    from patchaudit.store.objects import check_key

    check_key(f"{SECTIONS_PREFIX}{name}.json")
    store.write_bytes(f"{SECTIONS_PREFIX}{name}.json", json.dumps({"title": title, "html": html}).encode())
    return write_review_page(store) if redraw else None
