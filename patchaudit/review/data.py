"""What a review page shows, computed from a report with pyarrow compute and numpy (no loops over rows).

`collect` reads a report prefix (parts, summary.json, the optional comparison and extra sections
under review/) and returns a `ReviewData`: small lists and arrays, whatever the report's size.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from patchaudit.store import reports
from patchaudit.store.objects import ObjectStore

REVIEW_PREFIX = "review/"
COMPARISON_KEY = "review/comparison.json"  # written by the audit: this run against the line's previous run
SECTIONS_PREFIX = "review/sections/"  # <name>.json: {"title": ..., "html": ...}; shown in name order
HISTOGRAM_BINS = 40
TOP_FLAGGED = 24
MAX_FOLDERS = 30
MAX_ERROR_EXAMPLES = 50


@dataclass
class Histogram:
    edges: np.ndarray  # (bins + 1,)
    below: np.ndarray  # (bins,) images under the threshold
    above: np.ndarray  # (bins,) flagged images


@dataclass
class Folder:
    name: str
    images: int
    flagged: int
    errors: int

    @property
    def flag_rate(self) -> float:
        scored = self.images - self.errors
        return self.flagged / scored if scored else 0.0


@dataclass
class ReviewData:
    report_uri: str
    summary: dict[str, Any]
    rows: int
    scored: int
    flagged: int
    errors: int
    threshold: float | None
    histogram: Histogram | None
    folders: list[Folder]
    folders_more: int  # folders not shown (the page lists the MAX_FOLDERS largest)
    top: list[dict[str, Any]]  # image_uri, name, score, map_max, area, heatmap_href, image_href
    error_reasons: list[tuple[str, int]]
    error_examples: list[dict[str, Any]]
    comparison: dict[str, Any] | None = None
    sections: list[dict[str, str]] = field(default_factory=list)

    @property
    def flag_rate(self) -> float:
        return self.flagged / self.scored if self.scored else 0.0


def relative_href(from_dir_uri: str, to_uri: str | None) -> str | None:
    """A relative link from the report prefix to `to_uri`, or None when none can work.

    Works for a report opened from a folder (file:// or a plain path) and for one served as an S3
    static website (s3:// objects in the same bucket).
    """
    if not to_uri:
        return None
    a, b = urlsplit(_as_uri(from_dir_uri)), urlsplit(_as_uri(to_uri))
    if a.scheme != b.scheme or a.netloc != b.netloc:
        return None
    rel = posixpath.relpath(b.path or "/", (a.path or "/").rstrip("/") or "/")
    return quote(rel)


def _as_uri(uri: str) -> str:
    return uri if "://" in uri else "file://" + uri


def _histogram(scores: np.ndarray, flags: np.ndarray, threshold: float | None) -> Histogram | None:
    if not len(scores):
        return None
    lo, hi = float(scores.min()), float(scores.max())
    if threshold is not None:  # keep the threshold line on the plot
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
    below, _ = np.histogram(scores[~flags], bins=edges)
    above, _ = np.histogram(scores[flags], bins=edges)
    return Histogram(edges, below, above)


def _folders(table: pa.Table, input_uri: str | None) -> tuple[list[Folder], int]:
    if not table.num_rows:
        return [], 0
    uris = table["image_uri"]
    prefix = (input_uri.rstrip("/") + "/") if input_uri else ""
    if prefix and pc.all(pc.starts_with(uris, prefix)).as_py():
        rel = pc.utf8_slice_codeunits(uris, len(prefix))
    else:
        rel = pc.replace_substring_regex(uris, r"^[a-z0-9]+://[^/]*/", "")
    folder = pc.replace_substring_regex(rel, r"/?[^/]*$", "")
    t = pa.table(
        {
            "folder": folder,
            "flag": pc.fill_null(table["is_anomalous"], False).cast(pa.int64()),
            "err": pc.is_valid(table["error"]).cast(pa.int64()),
        }
    )
    g = t.group_by("folder").aggregate([("folder", "count"), ("flag", "sum"), ("err", "sum")])
    g = g.sort_by([("folder_count", "descending"), ("folder", "ascending")])
    shown = g.slice(0, MAX_FOLDERS).sort_by("folder").to_pylist()
    out = [Folder(r["folder"] or "(top level)", r["folder_count"], r["flag_sum"], r["err_sum"]) for r in shown]
    return out, max(0, g.num_rows - MAX_FOLDERS)


def _top(table: pa.Table, report_uri: str, input_uri: str | None) -> list[dict[str, Any]]:
    flagged = table.filter(pc.fill_null(table["is_anomalous"], False))
    if not flagged.num_rows:
        return []
    k = min(TOP_FLAGGED, flagged.num_rows)
    idx = pc.select_k_unstable(flagged, k=k, sort_keys=[("score", "descending")])
    top = flagged.take(idx).sort_by([("score", "descending"), ("image_uri", "ascending")])
    cols = top.select(["image_uri", "score", "map_max", "anomalous_area_fraction", "heatmap_uri"]).to_pylist()
    prefix = (input_uri.rstrip("/") + "/") if input_uri else ""
    out = []
    for r in cols:  # at most TOP_FLAGGED rows
        uri = r["image_uri"]
        name = uri[len(prefix) :] if prefix and uri.startswith(prefix) else uri.rsplit("/", 1)[-1]
        out.append(
            {
                "image_uri": uri,
                "name": name,
                "score": r["score"],
                "map_max": r["map_max"],
                "area": r["anomalous_area_fraction"],
                "heatmap_uri": r["heatmap_uri"],
                "heatmap_href": relative_href(report_uri, r["heatmap_uri"]),
                "image_href": relative_href(report_uri, uri),
            }
        )
    return out


def _errors(table: pa.Table) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
    errs = table.filter(pc.is_valid(table["error"]))
    if not errs.num_rows:
        return [], []
    reason = pc.replace_substring_regex(errs["error"], r":.*$", "")
    counts = pa.table({"reason": reason}).group_by("reason").aggregate([("reason", "count")])
    counts = counts.sort_by([("reason_count", "descending"), ("reason", "ascending")])
    reasons = list(zip(counts["reason"].to_pylist(), counts["reason_count"].to_pylist()))
    examples = errs.slice(0, MAX_ERROR_EXAMPLES).select(["image_uri", "error", "attempt", "worker"]).to_pylist()
    return reasons, examples


def read_optional_json(store: ObjectStore, key: str) -> Any:
    if not store.exists(key):
        return None
    try:
        return json.loads(store.read_bytes(key))
    except ValueError:
        return None


def read_sections(store: ObjectStore) -> list[dict[str, str]]:
    """Extra sections other commands stored in the report (review/sections/<name>.json), by name."""
    out = []
    for info in store.list(SECTIONS_PREFIX, extensions=".json"):
        doc = read_optional_json(store, info.key)
        if isinstance(doc, dict) and isinstance(doc.get("title"), str) and isinstance(doc.get("html"), str):
            out.append({"name": info.key[len(SECTIONS_PREFIX) : -5], "title": doc["title"], "html": doc["html"]})
    return out


def collect(store: ObjectStore, table: pa.Table | None = None, summary: dict[str, Any] | None = None) -> ReviewData:
    """Everything the page shows; `table`/`summary` skip re-reading them when the caller has them."""
    if table is None:
        table = reports.read_report(store)
    if summary is None:
        summary = reports.read_summary(store) if store.exists(reports.SUMMARY_KEY) else {}
    input_uri = summary.get("input_uri")
    scored_mask = pc.is_null(table["error"])
    scored = table.filter(scored_mask)
    scores = scored["score"].to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    flags = scored["is_anomalous"].to_numpy(zero_copy_only=False).astype(bool, copy=False)
    threshold = summary.get("threshold")
    if threshold is None and table.num_rows:
        threshold = float(pc.max(table["threshold"]).as_py())
    folders, more = _folders(table, input_uri)
    reasons, examples = _errors(table)
    return ReviewData(
        report_uri=store.uri,
        summary=summary,
        rows=table.num_rows,
        scored=scored.num_rows,
        flagged=int(flags.sum()),
        errors=table.num_rows - scored.num_rows,
        threshold=threshold,
        histogram=_histogram(scores, flags, threshold),
        folders=folders,
        folders_more=more,
        top=_top(table, store.uri, input_uri),
        error_reasons=reasons,
        error_examples=examples,
        comparison=read_optional_json(store, COMPARISON_KEY),
        sections=read_sections(store),
    )
