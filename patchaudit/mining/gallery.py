"""HTML for the mining outputs: a gallery per cluster and the diff section, as fragments the review page
embeds and as small self-contained pages of their own (`mining/clusters.html`, `diff/diff.html`).

Links to a report's heatmaps are relative (they work from a folder and from an S3 static site);
`page_dir` is where the page sits inside the report ("" for index.html, "mining/" for mining/clusters.html).
"""

from __future__ import annotations

import html
from typing import Any

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.cl{margin:1.2em 0;padding:.6em;border:1px solid #ddd;border-radius:6px}
.cl h3{margin:.2em 0 .5em}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.tile{width:160px;font-size:11px;word-break:break-all}
.tile img{width:160px;height:160px;object-fit:cover;border:1px solid #ccc}
table.d{border-collapse:collapse;font-size:13px}
table.d td,table.d th{border:1px solid #ddd;padding:3px 6px;text-align:right}
table.d td.l,table.d th.l{text-align:left}
.up{color:#b00}.down{color:#070}
"""


def relative(uri: str | None, report_uri: str, page_dir: str = "") -> str | None:
    """`uri` relative to a page at `page_dir` inside the report, when it lies inside the report."""
    if not uri:
        return None
    root = report_uri.rstrip("/") + "/"
    if uri.startswith(root):
        return "../" * page_dir.count("/") + uri[len(root):]
    return uri


def _tile(ex: dict[str, Any], report_uri: str, page_dir: str) -> str:
    name = html.escape(ex["image_uri"].rsplit("/", 2)[-2] + "/" + ex["image_uri"].rsplit("/", 1)[-1])
    src = relative(ex.get("heatmap_uri"), report_uri, page_dir)
    if src is None and ex["image_uri"].startswith(("file://", "http://", "https://")):
        src = ex["image_uri"]
    img = f'<img src="{html.escape(src)}" loading="lazy" alt="">' if src else ""
    score = "" if ex.get("score") is None else f" score {ex['score']:.3g}"
    return f'<div class="tile">{img}<br>{name}{score}</div>'


def cluster_gallery(summary: dict[str, Any], report_uri: str, page_dir: str = "") -> str:
    """A section per cluster with its size, mean score and most central images."""
    parts = [f"<h2>Clusters of {html.escape(summary['selection'])} images "
             f"({summary['images']} images, {summary['clusters']} clusters, by the {html.escape(summary['embedding'])} "
             f"feature)</h2>"]
    for g in summary["groups"]:
        mean = "" if g["mean_score"] is None else f", mean score {g['mean_score']:.3g}"
        tiles = "".join(_tile(ex, report_uri, page_dir) for ex in g["examples"])
        parts.append(f'<div class="cl"><h3>Cluster {g["cluster"]}: {g["size"]} images{mean}</h3>'
                     f'<div class="grid">{tiles}</div></div>')
    return "\n".join(parts)


def cluster_gallery_page(summary: dict[str, Any], report_uri: str, page_dir: str = "mining/") -> str:
    return _page("Clusters", cluster_gallery(summary, report_uri, page_dir))


def diff_section(summary: dict[str, Any], report_uri: str, page_dir: str = "") -> str:
    """The comparison with another run: counts, Spearman and the largest flag changes with heatmaps."""
    s = summary
    rate = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    rho = "n/a" if s.get("spearman") is None else f"{s['spearman']:.4f}"
    head = (f"<h2>Compared with {html.escape(s['old_report'])}</h2><p>models {html.escape(', '.join(s['old_models']))}"
            f" &rarr; {html.escape(', '.join(s['new_models']))}; matched {s['matched']} images (URI and etag); "
            f"<b class='up'>{s['newly_flagged']} newly flagged</b>, <b class='down'>{s['cleared']} cleared</b>; "
            f"flag rate {rate(s['old_flag_rate_matched'])} &rarr; {rate(s['new_flag_rate_matched'])}; "
            f"Spearman {rho}; only in the old run {s['only_old']}, only in this run {s['only_new']}, "
            f"file changed {s['etag_changed']}.</p>")
    tiles = []
    for ch in s.get("top_changes", []):
        heat = ch.get("new_heatmap") or ch.get("old_heatmap")
        ex = {"image_uri": ch["image_uri"], "heatmap_uri": heat, "score": ch["new_score"]}
        cls = "up" if ch["direction"] == "newly_flagged" else "down"
        label = f'<span class="{cls}">{html.escape(ch["direction"])} ({ch["old_score"]:.3g} &rarr; {ch["new_score"]:.3g})</span>'
        tiles.append(_tile(ex, report_uri, page_dir).replace('<div class="tile">', f'<div class="tile">{label}<br>', 1))
    return head + f'<div class="grid">{"".join(tiles)}</div>'


def diff_page(summary: dict[str, Any], report_uri: str, page_dir: str = "diff/") -> str:
    return _page("Diff", diff_section(summary, report_uri, page_dir))


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
