"""The bench report: one self-contained HTML file (inline CSS and SVG, heatmaps as data URIs).

Nothing is fetched when it opens: no scripts, fonts or images from elsewhere, so it works offline
and can be mailed around. Plots are hand-written SVG (no matplotlib). Input is the summary dict of
patchaudit.bench.runner.summarize plus the heatmap PNGs the workers wrote under configs/<id>/heatmaps/.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchaudit.workers.registry import METHODS

METHOD_COLORS = {"patchcore": "#1f5fbf", "padim": "#d9731a", "gaussian": "#2a9d4b", "simplenet": "#8e44ad"}
BACKBONE_PALETTE = ("#1f5fbf", "#d9731a", "#2a9d4b", "#b8322a", "#7b4fb0", "#7a5a3a")
MAX_HEATMAP_CONFIGS = 4
KIND_TITLES = {
    "top": "Highest-scoring test images",
    "false_positive": "Worst false positives: highest-scoring good images (false positives where flagged)",
    "missed": "Missed defects: lowest-scoring defective images (missed where passed)",
}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;
 padding:0 16px;color:#1d2430}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #d5dae1;
 padding-bottom:4px} h3{font-size:15px;margin:16px 0 6px}
.meta{color:#5b6573;margin:0 0 12px} .note{color:#5b6573;font-size:13px}
.cards{display:flex;gap:16px;flex-wrap:wrap} .card{flex:1 1 380px;border:1px solid #c9d3e0;border-radius:6px;
 padding:10px 14px;background:#f6f9fd} .card b.big{font-size:16px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0} th,td{border:1px solid #d5dae1;padding:3px 6px;
 text-align:right;white-space:nowrap} th{background:#eef2f7} td.l,th.l{text-align:left}
tr.rec td{background:#fff6d6} tr.fail td{color:#a33} .na{color:#9aa3ae}
.front{font-weight:600;color:#1f5fbf} .wide{overflow-x:auto} .plots{display:flex;gap:18px;flex-wrap:wrap}
.plot{border:1px solid #e1e6ec;border-radius:4px;padding:4px} .legend{font-size:12px;margin:4px 0 0}
.legend span{display:inline-block;margin-right:12px}
.swatch{display:inline-block;width:18px;height:3px;vertical-align:middle;margin-right:4px}
.strip{display:flex;gap:10px;flex-wrap:wrap;margin-bottom:8px}
figure{margin:0;width:232px} figure img{max-width:224px;max-height:224px;display:block;border:1px solid #ccc}
figcaption{font-size:11.5px;color:#3b4552;word-break:break-all}
.bad{color:#b8322a;font-weight:600} .good{color:#2a7d3b;font-weight:600}
"""


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return '<span class="na">n/a</span>'
    return f"{v:.{digits}f}"


GEOMETRY_NOTE = (
    "<p><b>Input geometry</b> (last part of a label; none = squash): squash resizes every image to "
    "size x size whatever its shape; aspect keeps the aspect ratio (the short side becomes the size, the other "
    "is rounded to the backbone stride); tile scores overlapping size x size tiles of the image at its own "
    "resolution (or @scale) against one model and stitches the maps, overlaps averaged, the image score from "
    "the stitched map.</p>"
)


def short_label(row: dict[str, Any]) -> str:
    """patchcore/tf_efficientnet_lite0/256/c0.1 -> pc/lite0/256 (for plot labels)."""
    info = METHODS.get(str(row.get("method")))
    m = info.short if info else row.get("method")
    b = str(row.get("backbone", "")).replace("tf_efficientnet_", "").replace("mobilenetv2_", "mnv2_")
    s = f"{m}/{b}/{row.get('image_size')}"
    if row.get("coreset_ratio") is not None:
        s += f"/c{row['coreset_ratio']:g}"
    if row.get("geometry") not in (None, "squash"):
        s += f"/{row['geometry']}"
    return s


# --------------------------------------------------------------------------- SVG plots


class Axis:
    """Maps data values to pixels; log scale when asked (values must then be > 0)."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, log: bool = False) -> None:
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        self.lo, self.hi, self.p0, self.p1, self.log = lo, hi, p0, p1, log

    def __call__(self, v: float) -> float:
        if self.log:
            v = math.log10(v)
        return self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)

    def ticks(self, n: int = 5) -> list[float]:
        if self.log:
            out = []
            for e in range(math.floor(self.lo), math.ceil(self.hi) + 1):
                for m in (1, 2, 5):
                    v = m * 10.0**e
                    if self.lo - 1e-9 <= math.log10(v) <= self.hi + 1e-9:
                        out.append(v)
            return out
        step = _nice_step((self.hi - self.lo) / n)
        start = math.ceil(self.lo / step) * step
        return [start + i * step for i in range(int((self.hi - start) / step + 1e-9) + 1)]


def _nice_step(raw: float) -> float:
    e = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * e:
            return m * e
    return 10 * e


def _tick_text(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def _frame(w: int, h: int, x: Axis, y: Axis, xlabel: str, ylabel: str, title: str) -> list[str]:
    out = [
        f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{esc(title)}" '
        f'font-family="system-ui,sans-serif" font-size="11">',
        f'<text x="{w / 2}" y="14" text-anchor="middle" font-size="13" font-weight="600">{esc(title)}</text>',
    ]
    for t in x.ticks():
        px = x(t)
        out.append(
            f'<line x1="{px:.1f}" y1="{y.p1}" x2="{px:.1f}" y2="{y.p0}" stroke="#eceff3"/>'
            f'<text x="{px:.1f}" y="{y.p0 + 14}" text-anchor="middle">{_tick_text(t)}</text>'
        )
    for t in y.ticks():
        py = y(t)
        out.append(
            f'<line x1="{x.p0}" y1="{py:.1f}" x2="{x.p1}" y2="{py:.1f}" stroke="#eceff3"/>'
            f'<text x="{x.p0 - 4}" y="{py + 4:.1f}" text-anchor="end">{_tick_text(t)}</text>'
        )
    out.append(
        f'<rect x="{x.p0}" y="{y.p1}" width="{x.p1 - x.p0}" height="{y.p0 - y.p1}" fill="none" stroke="#8a94a3"/>'
    )
    out.append(f'<text x="{(x.p0 + x.p1) / 2}" y="{h - 6}" text-anchor="middle">{esc(xlabel)}</text>')
    out.append(
        f'<text transform="translate(12,{(y.p0 + y.p1) / 2}) rotate(-90)" text-anchor="middle">{esc(ylabel)}</text>'
    )
    return out


def _span(vals: Sequence[float], pad: float = 0.06) -> tuple[float, float]:
    lo, hi = min(vals), max(vals)
    d = (hi - lo) or max(abs(hi), 1e-3) * 0.1
    return lo - pad * d, hi + pad * d


def scatter_svg(
    rows: Sequence[dict[str, Any]],
    xkey: str,
    ykey: str,
    flag: str,
    xlabel: str,
    ylabel: str,
    title: str,
    w: int = 600,
    h: int = 400,
) -> str:
    """Accuracy vs speed; colour = method, radius grows with model size; ringed = Pareto-optimal on
    accuracy, speed and size; dashed = the two-axis (accuracy, speed) front; star = recommended."""
    pts = [r for r in rows if r.get("status") == "ok" and r.get(xkey) and r.get(ykey) is not None]
    if not pts:
        return f'<p class="note">{esc(title)}: no configuration has these values.</p>'
    xs, ys = [r[xkey] for r in pts], [r[ykey] for r in pts]
    log_x = min(xs) > 0 and max(xs) / min(xs) > 4
    if log_x:
        x = Axis(min(xs) / 1.25, max(xs) * 1.25, 56, w - 16, log=True)
    else:
        x = Axis(*_span(xs), 56, w - 16)
    y = Axis(*_span(ys, 0.1), h - 40, 26)
    out = _frame(w, h, x, y, xlabel, ylabel, title)
    # two-axis front as a step line: walk by speed descending, keep running max of accuracy
    front, best = [], -math.inf
    for r in sorted(pts, key=lambda r: (-r[xkey], -r[ykey])):
        if r[ykey] > best:
            front.append(r)
            best = r[ykey]
    if len(front) > 1:
        d = " ".join(f"{'M' if i == 0 else 'L'}{x(r[xkey]):.1f},{y(r[ykey]):.1f}" for i, r in enumerate(front))
        out.append(f'<path d="{d}" fill="none" stroke="#8a94a3" stroke-dasharray="4 3"/>')
    sizes = [max(r.get("model_mb") or 0.0, 1e-3) for r in pts]
    s_lo, s_hi = math.log10(min(sizes)), math.log10(max(sizes))
    rec_key = "recommended" if flag == "pareto" else "recommended_image"
    labels: list[tuple[float, float, float, str]] = []
    radii: list[tuple[dict[str, Any], float]] = []
    for r, s in sorted(zip(pts, sizes), key=lambda p: -p[1]):  # big circles first, small on top
        rad = 4 + 8 * ((math.log10(s) - s_lo) / (s_hi - s_lo) if s_hi > s_lo else 0.5)
        radii.append((r, rad))
        cx, cy = x(r[xkey]), y(r[ykey])
        color = METHOD_COLORS.get(str(r.get("method")), "#555")
        optimal = bool(r.get(flag))
        tip = f"{r['label']}\n{ylabel} {r[ykey]:.4f}\n{xlabel} {r[xkey]:.3g}\nmodel {r.get('model_mb', 0):.2f} MB" + (
            "\nPareto-optimal" if optimal else ""
        )
        out.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{rad:.1f}" fill="{color}" '
            f'fill-opacity="{0.85 if optimal else 0.3}" stroke="{"#111" if optimal else color}" '
            f'stroke-width="{2 if optimal else 1}"><title>{esc(tip)}</title></circle>'
        )
        if r.get(rec_key):
            out.append(
                f'<text x="{cx:.1f}" y="{cy + 5:.1f}" text-anchor="middle" font-size="15" fill="#ffd21f" '
                f'stroke="#111" stroke-width="0.8">&#9733;</text>'
            )
        if optimal:
            labels.append((cx, cy, rad, short_label(r)))
    circles = [(x(r[xkey]) - rd, y(r[ykey]) - rd, x(r[xkey]) + rd, y(r[ykey]) + rd) for r, rd in radii]
    out.extend(place_labels(labels, (x.p0, y.p1, x.p1, y.p0), circles))
    out.append("</svg>")
    return "".join(out)


def place_labels(
    points: Sequence[tuple[float, float, float, str]],
    frame: tuple[float, float, float, float],
    obstacles: Sequence[tuple[float, float, float, float]] = (),
    char_w: float = 5.9,
    line_h: float = 12.0,
) -> list[str]:
    """SVG texts beside (cx, cy, radius, text) points, each moved to the first candidate spot that
    stays inside `frame` (x0, y0, x1, y1) and overlaps neither an obstacle box (the markers) nor a
    label placed before it (greedy)."""
    placed: list[tuple[float, float, float, float]] = list(obstacles)
    out = []
    for cx, cy, rad, text in points:
        w = char_w * len(text)
        spots = []
        for dy in (-3, 11, -15, 23, -27, 35, -39):
            spots += [(cx + rad + 3, cy + dy, "start"), (cx - rad - 3, cy + dy, "end")]
        best, fallback = None, None
        for tx, ty, anchor in spots:
            box = (tx if anchor == "start" else tx - w, ty - line_h + 2, tx + w if anchor == "start" else tx, ty + 2)
            inside = box[0] >= frame[0] and box[2] <= frame[2] and box[1] >= frame[1] and box[3] <= frame[3]
            free = all(box[2] <= p[0] or box[0] >= p[2] or box[3] <= p[1] or box[1] >= p[3] for p in placed)
            if inside and free:
                best = (tx, ty, anchor, box)
                break
            if inside:  # keep the inside spot that overlaps the least
                area = sum(
                    max(0.0, min(box[2], p[2]) - max(box[0], p[0])) * max(0.0, min(box[3], p[3]) - max(box[1], p[1]))
                    for p in placed
                )
                if fallback is None or area < fallback[0]:
                    fallback = (area, (tx, ty, anchor, box))
        if best is None:  # crowded: accept an overlap (inside the frame if possible) rather than drop the label
            tx, ty, anchor = spots[0]
            best = fallback[1] if fallback else (tx, ty, anchor, (tx, ty - line_h + 2, tx + w, ty + 2))
        tx, ty, anchor, box = best
        placed.append(box)
        out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" font-size="10.5">{esc(text)}</text>')
    return out


def roc_svg(
    curves: Sequence[tuple[str, str, str, list[float], list[float]]], title: str, w: int = 360, h: int = 340
) -> str:
    """ROC curves: (name, colour, dash, fpr, tpr) each; the chance diagonal dotted."""
    x, y = Axis(0, 1, 44, w - 12), Axis(0, 1, h - 40, 24)
    out = _frame(w, h, x, y, "false positive rate", "true positive rate", title)
    out.append(f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#b0b7c1" stroke-dasharray="2 3"/>')
    for name, color, dash, fpr, tpr in curves:
        d = " ".join(f"{'M' if i == 0 else 'L'}{x(a):.1f},{y(b):.1f}" for i, (a, b) in enumerate(zip(fpr, tpr)))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<path d="{d}" fill="none" stroke="{color}" stroke-width="1.6"{dash_attr}>'
            f"<title>{esc(name)}</title></path>"
        )
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------- sections


def _gap(optimism: float | None) -> str:
    """'0.010 above' / '0.002 below': how the full-split pick stands against the report-part number."""
    if optimism is None:
        return f"{fmt(None)} against"
    return f"{fmt(abs(optimism))} {'above' if optimism >= 0 else 'below'}"


def _recommendation_cards(summary: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str:
    cards = []
    for key, title in (
        ("recommended", "For scoring with heatmaps (image + localisation accuracy)"),
        ("recommended_image", "For pass/fail only (image AUROC; all methods)"),
    ):
        rec = summary.get(key)
        if rec is None:
            cards.append(
                f'<div class="card"><b>{esc(title)}</b><p>No Pareto-optimal configuration '
                f"(no configuration finished with these metrics).</p></div>"
            )
            continue
        r = by_id[rec["config_id"]]
        if "report" in rec:  # nested selection: the report part's numbers first, they chose nothing
            accuracy_text = (
                f"<p><b>Report part</b> (images not used to choose): image AUROC {fmt(r.get('rep_image_auroc'))}, "
                f"pixel AUROC {fmt(r.get('rep_pixel_auroc'))}, AUPRO {fmt(r.get('rep_aupro'))}, "
                f"F1 at the calibrated threshold {fmt(r.get('rep_f1'))}.</p>"
                f'<p class="note">{esc(rec["metric"].replace("_", " "))}: report part {fmt(rec["report"])}, '
                f"selection part {fmt(rec['selection'])} (ranked on it), full split {fmt(rec['full'])}; "
                f"choosing and reporting on the full split would have shown {fmt(rec['optimistic_full'])} "
                f"({_gap(rec['optimism'])} the report-part number).</p>"
            )
        else:
            accuracy_text = (
                f"<p><b>Full test split</b> (also used to choose: optimistic): image AUROC {fmt(r['image_auroc'])}, "
                f"pixel AUROC {fmt(r['pixel_auroc'])}, AUPRO {fmt(r['aupro'])}, "
                f"F1 at the calibrated threshold {fmt(r['f1'])}.</p>"
            )
        cards.append(
            f'<div class="card"><b>{esc(title)}</b><p><b class="big">{esc(rec["label"])}</b> '
            f'<span class="note">({esc(rec["config_id"])}; config: {esc(key)}.yaml)</span></p>'
            + accuracy_text
            + f"<p>{r['images_per_s']:.2f} images/s ({r['images_per_cpu_s']:.2f} per CPU-second), model "
            f"{r['model_mb']:.1f} MB, peak memory {r['peak_rss_mb']:.0f} MB, fit {r['fit_s']:.0f} s.</p>"
            f'<p class="note">Why: {esc(rec["reason"])}.</p></div>'
        )
    return '<div class="cards">' + "".join(cards) + "</div>"


def _results_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "configuration",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
        "accuracy",
        "F1",
        "precision",
        "recall",
        "selection accuracy",
        "report accuracy",
        "fit s",
        "images/s",
        "img / CPU-s",
        "model MB",
        "peak MB",
        "Pareto",
    )
    out = [
        "<table><tr>"
        + "".join(f'<th class="{"l" if i == 0 else ""}">{esc(h)}</th>' for i, h in enumerate(head))
        + "</tr>"
    ]
    for r in rows:
        if r.get("status") != "ok":
            out.append(
                f'<tr class="fail"><td class="l">{esc(r.get("label"))}</td>'
                f'<td class="l" colspan="{len(head) - 1}">failed: {esc(r.get("error"))}</td></tr>'
            )
            continue
        marks = []
        if r.get("pareto"):
            marks.append("pixel")
        if r.get("pareto_image"):
            marks.append("image")
        star = " &#9733;" if r.get("recommended") or r.get("recommended_image") else ""
        cls = ' class="rec"' if star else ""
        out.append(
            f'<tr{cls}><td class="l">{esc(r["label"])}{star}</td>'
            f"<td>{fmt(r['image_auroc'])}</td><td>{fmt(r['pixel_auroc'])}</td><td>{fmt(r['aupro'])}</td>"
            f"<td>{fmt(r['accuracy'])}</td><td>{fmt(r['f1'])}</td><td>{fmt(r['precision'])}</td>"
            f"<td>{fmt(r['recall'])}</td><td>{fmt(r.get('sel_accuracy'))}</td><td>{fmt(r.get('rep_accuracy'))}</td>"
            f"<td>{r['fit_s']:.0f}</td><td>{r['images_per_s']:.2f}</td>"
            f"<td>{r['images_per_cpu_s']:.2f}</td><td>{r['model_mb']:.1f}</td><td>{r['peak_rss_mb']:.0f}</td>"
            f'<td class="l front">{" + ".join(marks)}</td></tr>'
        )
    out.append("</table>")
    return '<div class="wide">' + "".join(out) + "</div>"


def _roc_section(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    res_by_id = {r.get("config_id"): r for r in summary["results"]}
    backbones = sorted({r["backbone"] for r in rows if r.get("status") == "ok"})
    sizes = sorted({r["image_size"] for r in rows if r.get("status") == "ok"})
    color = {b: BACKBONE_PALETTE[i % len(BACKBONE_PALETTE)] for i, b in enumerate(backbones)}
    dashes = ["", "6 3", "2 2", "8 3 2 3"]
    dash = {s: dashes[i % len(dashes)] for i, s in enumerate(sizes)}
    plots = []
    for method in METHODS:
        curves = []
        for r in rows:
            if r.get("status") != "ok" or r["method"] != method:
                continue
            roc = res_by_id[r["config_id"]].get("roc") or {}
            if roc.get("fpr"):
                curves.append(
                    (
                        f"{r['label']}: image AUROC {r['image_auroc']:.4f} (full split)",
                        color[r["backbone"]],
                        dash[r["image_size"]],
                        roc["fpr"],
                        roc["tpr"],
                    )
                )
        if curves:
            plots.append(f'<div class="plot">{roc_svg(curves, f"{method}: image-level ROC, full test split")}</div>')
    legend = "".join(f'<span><i class="swatch" style="background:{c}"></i>{esc(b)}</span>' for b, c in color.items())
    for s in sizes:
        dash_attr = f' stroke-dasharray="{dash[s]}"' if dash[s] else ""
        legend += (
            f'<span><svg width="22" height="6"><line x1="0" y1="3" x2="22" y2="3" stroke="#333" '
            f'stroke-width="1.6"{dash_attr}/></svg> {s} px</span>'
        )
    return f'<div class="plots">{"".join(plots)}</div><p class="legend">{legend}</p>'


def _per_defect_table(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    res_by_id = {r.get("config_id"): r for r in summary["results"]}
    ok = [r for r in rows if r.get("status") == "ok"]
    kinds = sorted({k for r in ok for k in res_by_id[r["config_id"]].get("per_defect", {})})
    if not kinds:
        return '<p class="note">No per-defect results.</p>'
    counts = {}
    for r in ok:
        for k, d in res_by_id[r["config_id"]].get("per_defect", {}).items():
            counts[k] = d.get("count")
    out = [
        '<table><tr><th class="l">configuration</th>'
        + "".join(f"<th>{esc(k)} (n={esc(counts.get(k))})</th>" for k in kinds)
        + "</tr>"
    ]
    for r in ok:
        pd = res_by_id[r["config_id"]].get("per_defect", {})
        cells = []
        for k in kinds:
            d = pd.get(k)
            cell = f"{fmt(d.get('image_auroc'))} / {fmt(d.get('aupro'))}" if d else fmt(None)
            cells.append(f"<td>{cell}</td>")
        out.append(f'<tr><td class="l">{esc(r["label"])}</td>{"".join(cells)}</tr>')
    out.append("</table>")
    return "".join(out)


def _heatmap_configs(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(config_id, why shown): the recommendations, then the most accurate configurations."""
    picks: list[tuple[str, str]] = []
    for key, why in (("recommended", "recommended (heatmaps)"), ("recommended_image", "recommended (pass/fail)")):
        if summary.get(key):
            picks.append((summary[key]["config_id"], why))
    ok = [r for r in rows if r.get("status") == "ok"]
    for key, why in (("accuracy", "best accuracy, full split"), ("image_auroc", "best image AUROC, full split")):
        cand = [r for r in ok if r.get(key) is not None]
        if cand:
            picks.append((max(cand, key=lambda r: r[key])["config_id"], why))
    merged: dict[str, list[str]] = {}
    for cid, why in picks:
        merged.setdefault(cid, []).append(why)
    return [(cid, ", ".join(whys)) for cid, whys in list(merged.items())[:MAX_HEATMAP_CONFIGS]]


def _data_uri(path: Path) -> str | None:
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None


def _heatmap_section(summary: dict[str, Any], rows: Sequence[dict[str, Any]], out_dir: Path) -> str:
    res_by_id = {r.get("config_id"): r for r in summary["results"]}
    parts = []
    for cid, why in _heatmap_configs(summary, rows):
        res = res_by_id[cid]
        thr = res.get("threshold")
        parts.append(f'<h3>{esc(res["label"])} <span class="note">({esc(why)}; threshold {fmt(thr, 4)})</span></h3>')
        for kind, title in KIND_TITLES.items():
            figs = []
            for hm in (h for h in res.get("heatmaps", []) if h["kind"] == kind):
                src = _data_uri(out_dir / "configs" / cid / hm["file"])
                if src is None:
                    continue
                verdict = (
                    '<span class="bad">flagged</span>' if hm["is_anomalous"] else '<span class="good">passed</span>'
                )
                figs.append(
                    f'<figure><img src="{src}" alt="{esc(hm["key"])}"><figcaption>{esc(hm["key"])}<br>'
                    f"{esc(hm['defect_type'])}, score {hm['score']:.4g}: {verdict}</figcaption></figure>"
                )
            if figs:
                parts.append(f'<p class="note">{esc(title)}</p><div class="strip">{"".join(figs)}</div>')
    if not parts:
        return '<p class="note">No heatmaps were written.</p>'
    return (
        '<p class="note">Overlay colour scale per model: calibration median (dark blue) to twice the threshold '
        "(red); white outline = ground-truth defect mask. Gaussian AD has no map: the image alone is shown. "
        "Examples are picked from the full test split (both parts).</p>" + "".join(parts)
    )


def render_report(summary: dict[str, Any], out_dir: str | Path) -> str:
    out_dir = Path(out_dir)
    rows = summary["rows"]
    by_id = {r["config_id"]: r for r in rows}
    speed = summary["speed_metric"]
    speed_label = (
        "images per second (end to end, decode included)"
        if speed == "images_per_s"
        else "images per CPU-second (scoring)"
    )
    n_ok = sum(r.get("status") == "ok" for r in rows)
    nested = summary.get("selection", {}).get("fraction", 0) > 0
    sel, part = ("sel_", ", selection part") if nested else ("", "")
    mach = summary.get("machine", {})
    body = [
        f"<h1>patchaudit bench: {esc(summary['dataset'])}</h1>",
        f'<p class="meta">{n_ok} of {len(rows)} configurations finished &middot; data {esc(summary["data"])} &middot; '
        f"{esc(summary['created_at'])} &middot; {esc(mach.get('cpus'))} CPUs, load average at summary "
        f"{esc(mach.get('load_avg_at_summary'))}</p>",
        "<h2>Protocol and definitions</h2>",
        f"<p><b>Honest protocol:</b> {esc(summary['protocol'])}.</p>",
        f"<p><b>Accuracy:</b> {esc(summary['accuracy_definition'])}</p>",
        f"<p><b>Pareto and recommendation:</b> {esc(summary['rule'])} Speed axis: {esc(speed_label)}; "
        f"tolerance {summary['tolerance']:g}.</p>",
        *([GEOMETRY_NOTE] if any(r.get("geometry") not in (None, "squash") for r in rows) else []),
        "<p><b>Feature levels</b> (timm out_indices): "
        + "; ".join(f"{esc(m)} {','.join(map(str, v))}" for m, v in summary.get("layers", {}).items())
        + ".</p>",
        '<p class="note">Timings come from one run each on this machine; when it is shared with other jobs, '
        "wall-clock speed varies with their load (the images per CPU-second column is less sensitive). "
        "Peak memory is each configuration's own process (fit, scoring and metrics; all test maps are held "
        "for the metrics). Model size is the saved model's files on disk.</p>",
        "<h2>Recommendation</h2>",
        f"<p><b>Which images each number comes from:</b> {esc(summary.get('selection', {}).get('rule', ''))}</p>",
        _recommendation_cards(summary, by_id),
        "<h2>All configurations</h2>",
        '<p class="note">Metric columns up to recall: the full test split. Selection / report accuracy: the '
        "two parts of the nested selection (ranking and Pareto fronts use the selection part when it is on). "
        "Pareto: <b>pixel</b> = optimal on (accuracy, speed, size) among map methods; "
        "<b>image</b> = optimal on (image AUROC, speed, size) among all. &#9733; = recommended.</p>",
        _results_table(rows),
        "<h2>Accuracy vs speed</h2>",
        '<div class="plots"><div class="plot">'
        + scatter_svg(
            rows,
            speed,
            f"{sel}accuracy",
            "pareto",
            speed_label.split(" (")[0],
            f"accuracy{part}",
            f"accuracy (image AUROC + AUPRO)/2{part} vs speed",
        )
        + '</div><div class="plot">'
        + scatter_svg(
            rows,
            speed,
            f"{sel}image_auroc",
            "pareto_image",
            speed_label.split(" (")[0],
            f"image AUROC{part}",
            f"image AUROC{part} vs speed (all methods)",
        )
        + "</div></div>",
        '<p class="legend">'
        + "".join(
            f'<span><i class="swatch" style="background:{c};height:10px;width:10px;border-radius:5px"></i>{m}</span>'
            for m, c in METHOD_COLORS.items()
        )
        + "<span>circle area grows with model size (log)</span><span>ringed + labelled = Pareto-optimal on all "
        "three axes</span><span>dashed = front on the two plotted axes</span><span>&#9733; = recommended</span></p>",
        "<h2>ROC curves (image level, full test split)</h2>",
        _roc_section(summary, rows),
        "<h2>Per defect type</h2>",
        '<p class="note">Full test split (both parts). Each cell: image AUROC / AUPRO of that defect type against '
        "all good test images.</p>",
        _per_defect_table(summary, rows),
        "<h2>Heatmaps</h2>",
        _heatmap_section(summary, rows, out_dir),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>patchaudit bench: {esc(summary['dataset'])}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write_report(summary: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(summary, out_dir), encoding="utf-8")
    tmp.replace(path)
    return path
