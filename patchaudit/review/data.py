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


REVIEW_COLUMNS = [
    "image_uri",
    "score",
    "is_anomalous",
    "error",
    "threshold",
    "map_max",
    "anomalous_area_fraction",
    "heatmap_uri",
    "attempt",
    "worker",
]


def _first(table: pa.Table, k: int, sort_keys: list[tuple[str, str]]) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=sort_keys)[:k]) if table.num_rows > k else table


class _Pieces:
    """What the page needs, gathered from a report read in pieces (any order): scores and flags
    (9 bytes an image, for the histogram), counts per folder, the top flagged, the first errors."""

    def __init__(self, input_uri: str | None) -> None:
        self.input_uri = input_uri
        self.rows = 0
        self.max_threshold: float | None = None
        self.scores: list[np.ndarray] = []
        self.flags: list[np.ndarray] = []
        self.folder_counts: pa.Table | None = None
        self.flagged: pa.Table | None = None
        self.errors: pa.Table | None = None
        self.error_counts: pa.Table | None = None

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        if not table.num_rows:
            return
        t = pc.max(table["threshold"]).as_py()
        self.max_threshold = t if self.max_threshold is None else max(self.max_threshold, t)
        scored = table.filter(pc.is_null(table["error"]))
        self.scores.append(scored["score"].to_numpy(zero_copy_only=False).astype(np.float64, copy=False))
        self.flags.append(scored["is_anomalous"].to_numpy(zero_copy_only=False).astype(bool, copy=False))
        g = _folder_counts(table, self.input_uri)
        self.folder_counts = g if self.folder_counts is None else _merge_counts(self.folder_counts, g)
        flagged = table.filter(pc.fill_null(table["is_anomalous"], False))
        top_keys = [("score", "descending"), ("image_uri", "ascending")]
        flagged = _first(flagged, TOP_FLAGGED, top_keys)
        self.flagged = (
            flagged
            if self.flagged is None
            else _first(pa.concat_tables([self.flagged, flagged]), TOP_FLAGGED, top_keys)
        )
        errs = table.filter(pc.is_valid(table["error"]))
        if errs.num_rows:
            reason = pc.replace_substring_regex(errs["error"], r":.*$", "")
            errs = errs.select(["image_uri", "error", "attempt", "worker"]).append_column("reason", reason)
            keep = _first(errs, MAX_ERROR_EXAMPLES, [("image_uri", "ascending")])
            counts = pa.table({"reason": reason}).group_by("reason").aggregate([("reason", "count")])
            counts = counts.select(["reason", "reason_count"])
            self.errors = pa.concat_tables([t for t in (self.errors, keep) if t is not None])
            self.errors = _first(self.errors, MAX_ERROR_EXAMPLES, [("image_uri", "ascending")])
            self.error_counts = counts if self.error_counts is None else _merge_reason_counts(self.error_counts, counts)


def _folder_counts(table: pa.Table, input_uri: str | None) -> pa.Table:
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
    return g.select(["folder", "folder_count", "flag_sum", "err_sum"])


def _merge_counts(a: pa.Table, b: pa.Table) -> pa.Table:
    g = (
        pa.concat_tables([a, b])
        .group_by("folder")
        .aggregate([("folder_count", "sum"), ("flag_sum", "sum"), ("err_sum", "sum")])
    )
    cols = ["folder", "folder_count_sum", "flag_sum_sum", "err_sum_sum"]
    return g.select(cols).rename_columns(["folder", "folder_count", "flag_sum", "err_sum"])


def _merge_reason_counts(a: pa.Table, b: pa.Table) -> pa.Table:
    g = pa.concat_tables([a, b]).group_by("reason").aggregate([("reason_count", "sum")])
    return g.select(["reason", "reason_count_sum"]).rename_columns(["reason", "reason_count"])


def collect(store: ObjectStore, table: pa.Table | None = None, summary: dict[str, Any] | None = None) -> ReviewData:
    """Everything the page shows; `table`/`summary` skip re-reading them when the caller has them.
    Without `table` the report is read in pieces (compacted row groups or parts), never whole."""
    if summary is None:
        summary = reports.read_summary(store) if store.exists(reports.SUMMARY_KEY) else {}
    input_uri = summary.get("input_uri")
    pieces = _Pieces(input_uri)
    for chunk in [table] if table is not None else reports.iter_tables(store, columns=REVIEW_COLUMNS):
        pieces.add(chunk.select(REVIEW_COLUMNS))
    scores = np.concatenate(pieces.scores) if pieces.scores else np.empty(0)
    flags = np.concatenate(pieces.flags) if pieces.flags else np.empty(0, bool)
    threshold = summary.get("threshold")
    if threshold is None and pieces.rows:
        threshold = float(pieces.max_threshold) if pieces.max_threshold is not None else None
    folders: list[Folder] = []
    more = 0
    if pieces.folder_counts is not None:
        g = pieces.folder_counts.sort_by([("folder_count", "descending"), ("folder", "ascending")])
        shown = g.slice(0, MAX_FOLDERS).sort_by("folder").to_pylist()
        folders = [Folder(r["folder"] or "(top level)", r["folder_count"], r["flag_sum"], r["err_sum"]) for r in shown]
        more = max(0, g.num_rows - MAX_FOLDERS)
    reasons: list[tuple[str, int]] = []
    examples: list[dict[str, Any]] = []
    if pieces.errors is not None and pieces.error_counts is not None:
        counts = pieces.error_counts.sort_by([("reason_count", "descending"), ("reason", "ascending")])
        reasons = list(zip(counts["reason"].to_pylist(), counts["reason_count"].to_pylist()))
        examples = pieces.errors.select(["image_uri", "error", "attempt", "worker"]).to_pylist()
    n_errors = int(sum(n for _, n in reasons))
    return ReviewData(
        report_uri=store.uri,
        summary=summary,
        rows=pieces.rows,
        scored=len(scores),
        flagged=int(flags.sum()),
        errors=n_errors,
        threshold=threshold,
        histogram=_histogram(scores, flags, threshold),
        folders=folders,
        folders_more=more,
        top=_top(pieces.flagged, store.uri, input_uri) if pieces.flagged is not None else [],
        error_reasons=reasons,
        error_examples=examples,
        comparison=read_optional_json(store, COMPARISON_KEY),
        sections=read_sections(store),
    )
