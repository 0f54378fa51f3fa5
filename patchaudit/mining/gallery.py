"""HTML for the mining outputs: a gallery per cluster and the diff section, as fragments the review page
embeds and as small self-contained pages of their own (`mining/clusters.html`, `diff/diff.html`).

Links to a report's heatmaps are relative (they work from a folder and from an S3 static site);
`page_dir` is where the page sits inside the report ("" for index.html, "mining/" for mining/clusters.html).
"""

from __future__ import annotations

import html
from typing import Any

PAGE_CSS = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
# Scoped class names: the fragments sit inside the review page, next to its own styles.
CSS = """
.mn-cl{margin:1em 0;padding:.6em;border:1px solid #ddd;border-radius:6px}
.mn-cl h3{margin:.2em 0 .5em;font-size:15px}
.mn-grid{display:flex;flex-wrap:wrap;gap:8px}
.mn-tile{width:160px;font-size:11px;word-break:break-all}
.mn-tile img{width:160px;height:160px;object-fit:cover;border:1px solid #ccc;display:block}
.mn-up{color:#b00}.mn-down{color:#070}
"""


def relative(uri: str | None, report_uri: str, page_dir: str = "") -> str | None:
    """A relative link from a page at `page_dir` inside the report to `uri` (a heatmap of the report, or an
    input image in the same bucket or file system); `uri` itself when no relative link can work."""
    from patchaudit.review.data import relative_href

    if not uri:
        return None
    if not report_uri:
        return uri
    base = report_uri.rstrip("/") + ("/" + page_dir.strip("/") if page_dir.strip("/") else "")
    return relative_href(base, uri) or uri


def _tile(ex: dict[str, Any], report_uri: str, page_dir: str) -> str:
    name = html.escape(ex["image_uri"].rsplit("/", 2)[-2] + "/" + ex["image_uri"].rsplit("/", 1)[-1])
    src = relative(ex.get("heatmap_uri") or ex["image_uri"], report_uri, page_dir)
    img = f'<img src="{html.escape(src)}" loading="lazy" alt="">' if src else ""
    score = "" if ex.get("score") is None else f" score {ex['score']:.3g}"
    return f'<div class="mn-tile">{img}{name}{score}</div>'


def cluster_gallery(summary: dict[str, Any], report_uri: str, page_dir: str = "") -> str:
    """A section per cluster with its size, mean score and most central images."""
    parts = [
        f"<style>{CSS}</style><p>{summary['images']} {html.escape(summary['selection'])} images in "
        f"{summary['clusters']} clusters by the {html.escape(summary['embedding'])} embedding (k-means); each cluster "
        f"shows its most central images, so a reviewer sees defect types rather than one long list.</p>"
    ]
    for g in summary["groups"]:
        mean = "" if g["mean_score"] is None else f", mean score {g['mean_score']:.3g}"
        tiles = "".join(_tile(ex, report_uri, page_dir) for ex in g["examples"])
        parts.append(
            f'<div class="mn-cl"><h3>Cluster {g["cluster"]}: {g["size"]} images{mean}</h3>'
            f'<div class="mn-grid">{tiles}</div></div>'
        )
    return "\n".join(parts)


def cluster_gallery_page(summary: dict[str, Any], report_uri: str, page_dir: str = "mining/") -> str:
    return _page(f"Clusters of {summary['report']}", cluster_gallery(summary, report_uri, page_dir))


def diff_section(summary: dict[str, Any], report_uri: str, page_dir: str = "") -> str:
    """The comparison with another run: counts, Spearman and the largest flag changes with heatmaps."""
    s = summary
    rate = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    rho = "n/a" if s.get("spearman") is None else f"{s['spearman']:.4f}"
    head = (
        f"<style>{CSS}</style><p>Earlier run {html.escape(s['old_report'])}; models {html.escape(', '.join(s['old_models']))}"
        f" &rarr; {html.escape(', '.join(s['new_models']))}; matched {s['matched']} images (URI and etag); "
        f"<b class='mn-up'>{s['newly_flagged']} newly flagged</b>, <b class='mn-down'>{s['cleared']} cleared</b>; "
        f"flag rate {rate(s['old_flag_rate_matched'])} &rarr; {rate(s['new_flag_rate_matched'])}; "
        f"Spearman {rho}; only in the old run {s['only_old']}, only in this run {s['only_new']}, "
        f"file changed {s['etag_changed']}.</p>"
    )
    tiles = []
    for ch in s.get("top_changes", []):
        heat = ch.get("new_heatmap") or ch.get("old_heatmap")
        ex = {"image_uri": ch["image_uri"], "heatmap_uri": heat, "score": ch["new_score"]}
        cls = "mn-up" if ch["direction"] == "newly_flagged" else "mn-down"
        label = f'<span class="{cls}">{html.escape(ch["direction"])} ({ch["old_score"]:.3g} &rarr; {ch["new_score"]:.3g})</span>'
        tiles.append(
            _tile(ex, report_uri, page_dir).replace('<div class="mn-tile">', f'<div class="mn-tile">{label}', 1)
        )
    return (
        head + f"<p>The largest flag changes (by the change of score relative to each run's threshold):</p>"
        f'<div class="mn-grid">{"".join(tiles)}</div>'
    )


def diff_page(summary: dict[str, Any], report_uri: str, page_dir: str = "diff/") -> str:
    return _page(
        f"Diff {summary['old_report']} -> {summary['new_report']}", diff_section(summary, report_uri, page_dir)
    )


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_CSS}</style></head><body><h2>{html.escape(title)}</h2>{body}</body></html>\n"
    )
