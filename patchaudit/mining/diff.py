"""`patchaudit diff OLD NEW`: what changed between two runs over the same images (reprocessing).

Images are matched by URI and etag: the same URI with another etag is another file, listed as
changed, not compared. For matched images scored in both runs: the flag changes in both directions
(ordered by the change of score relative to each run's threshold, so a PatchCore run and a PaDiM run,
whose scores live on different scales, compare), the Spearman correlation of the scores, and the
flag rate per folder. All aggregation is SQL in DuckDB over Arrow tables: no Python loop over rows.

Two reports of different models are the normal case (a model changed). What is refused: two reports
that share no image URI (another product line's report, say) - there is nothing to compare.

Outputs (written to --out, by default the NEW report's `diff/` prefix; `diff.json` last, so a reader
that sees it sees complete files):
    changes.parquet    matched images whose flag changed, largest relative score change first
    folders.parquet    per folder: images in each run, matched, flag rate old/new and the change
    unmatched.parquet  images only in OLD, only in NEW, or with a changed etag
    diff.json          counts, Spearman, model ids, the top changes (what the review page shows)
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from patchaudit.errors import MiningError
from patchaudit.mining.reportio import Report, model_ids, read_columns
from patchaudit.store.objects import ObjectStore

DIFF_PREFIX = "diff/"
COLUMNS = ["image_uri", "etag", "model_id", "score", "is_anomalous", "threshold", "error", "heatmap_uri"]
TOP = 20  # changes kept in diff.json for printing and the review page


@dataclass
class DiffResult:
    summary: dict[str, Any]
    changes: pa.Table
    folders: pa.Table
    unmatched: pa.Table


def _connect() -> Any:
    import duckdb

    # The tables are handed over from Python; nothing needs files or the network.
    return duckdb.connect(config={"threads": 2, "enable_external_access": False})


_MATCH_SQL = """
CREATE TEMP TABLE m AS
SELECT o.image_uri, regexp_replace(o.image_uri, '/[^/]*$', '') AS folder,
       o.score AS old_score, n.score AS new_score,
       o.is_anomalous AS old_flag, n.is_anomalous AS new_flag,
       o.score / nullif(o.threshold, 0) AS old_rel, n.score / nullif(n.threshold, 0) AS new_rel,
       o.heatmap_uri AS old_heatmap, n.heatmap_uri AS new_heatmap,
       o.error AS old_error, n.error AS new_error
FROM old_r o JOIN new_r n ON o.image_uri = n.image_uri AND o.etag = n.etag
"""

_CHANGES_SQL = """
SELECT image_uri, folder,
       CASE WHEN new_flag THEN 'newly_flagged' ELSE 'cleared' END AS direction,
       old_score, new_score, old_rel, new_rel, new_rel - old_rel AS rel_change,
       old_heatmap, new_heatmap
FROM m
WHERE old_error IS NULL AND new_error IS NULL AND old_flag <> new_flag
ORDER BY abs(new_rel - old_rel) DESC, image_uri
"""

# Average ranks for ties, then Pearson on the ranks = Spearman.
_SPEARMAN_SQL = """
WITH s AS (SELECT old_score, new_score FROM m WHERE old_error IS NULL AND new_error IS NULL),
r AS (
  SELECT rank() OVER (ORDER BY old_score) + (count(*) OVER (PARTITION BY old_score) - 1) / 2.0 AS ro,
         rank() OVER (ORDER BY new_score) + (count(*) OVER (PARTITION BY new_score) - 1) / 2.0 AS rn
  FROM s)
SELECT corr(ro, rn), count(*) FROM r
"""

_FOLDERS_SQL = """
WITH o AS (SELECT regexp_replace(image_uri, '/[^/]*$', '') AS folder, count(*) AS n,
                  avg(CASE WHEN is_anomalous THEN 1.0 ELSE 0.0 END) FILTER (WHERE error IS NULL) AS rate
           FROM old_r GROUP BY 1),
     n AS (SELECT regexp_replace(image_uri, '/[^/]*$', '') AS folder, count(*) AS n,
                  avg(CASE WHEN is_anomalous THEN 1.0 ELSE 0.0 END) FILTER (WHERE error IS NULL) AS rate
           FROM new_r GROUP BY 1),
     mm AS (SELECT folder, count(*) AS matched,
                   count(*) FILTER (WHERE old_error IS NULL AND new_error IS NULL AND old_flag <> new_flag) AS flips
            FROM m GROUP BY 1)
SELECT coalesce(o.folder, n.folder) AS folder, coalesce(o.n, 0) AS old_images, coalesce(n.n, 0) AS new_images,
       coalesce(mm.matched, 0) AS matched, coalesce(mm.flips, 0) AS flag_changes,
       o.rate AS old_flag_rate, n.rate AS new_flag_rate, n.rate - o.rate AS flag_rate_change
FROM o FULL OUTER JOIN n ON o.folder = n.folder LEFT JOIN mm ON mm.folder = coalesce(o.folder, n.folder)
ORDER BY abs(coalesce(n.rate - o.rate, 0)) DESC, folder
"""

_UNMATCHED_SQL = """
SELECT o.image_uri, CASE WHEN n.image_uri IS NULL THEN 'only_old' ELSE 'etag_changed' END AS reason,
       o.etag AS old_etag, n.etag AS new_etag
FROM old_r o LEFT JOIN new_r n ON o.image_uri = n.image_uri
WHERE n.image_uri IS NULL OR o.etag <> n.etag
UNION ALL
SELECT n.image_uri, 'only_new', NULL, n.etag
FROM new_r n ANTI JOIN old_r o ON o.image_uri = n.image_uri
ORDER BY 2, 1
"""


def compute_diff(old: Report, new: Report) -> DiffResult:
    """Compare two reports (see the module docstring); raises MiningError when they share no image."""
    t0 = time.perf_counter()
    old_r = read_columns(old, COLUMNS)
    new_r = read_columns(new, COLUMNS)
    con = _connect()
    con.register("old_r", old_r)
    con.register("new_r", new_r)
    shared = con.execute("SELECT count(*) FROM old_r o SEMI JOIN new_r n ON o.image_uri = n.image_uri").fetchone()[0]
    old_models, new_models = model_ids(old_r), model_ids(new_r)
    if shared == 0:
        raise MiningError(
            f"{old.uri} (model {', '.join(old_models)}) and {new.uri} (model {', '.join(new_models)}) share no "
            "image: diff compares two runs over the same images (e.g. an archive rescored with a new model)"
        )
    con.execute(_MATCH_SQL)
    changes = con.execute(_CHANGES_SQL).to_arrow_table()
    spearman, n_both = con.execute(_SPEARMAN_SQL).fetchone()
    folders = con.execute(_FOLDERS_SQL).to_arrow_table()
    unmatched = con.execute(_UNMATCHED_SQL).to_arrow_table()
    counts = con.execute(
        """SELECT count(*),
                  count(*) FILTER (WHERE old_error IS NULL AND new_error IS NULL),
                  count(*) FILTER (WHERE old_error IS NULL AND new_error IS NULL AND NOT old_flag AND new_flag),
                  count(*) FILTER (WHERE old_error IS NULL AND new_error IS NULL AND old_flag AND NOT new_flag),
                  count(*) FILTER (WHERE old_error IS NULL AND new_error IS NULL AND old_flag AND new_flag),
                  avg(CASE WHEN old_flag THEN 1.0 ELSE 0.0 END) FILTER (WHERE old_error IS NULL),
                  avg(CASE WHEN new_flag THEN 1.0 ELSE 0.0 END) FILTER (WHERE new_error IS NULL)
           FROM m"""
    ).fetchone()
    con.register("unmatched_t", unmatched)
    by_reason = dict(con.execute("SELECT reason, count(*) FROM unmatched_t GROUP BY 1").fetchall())
    con.close()
    top = (
        changes.slice(0, TOP)
        .select(["image_uri", "direction", "old_score", "new_score", "rel_change", "old_heatmap", "new_heatmap"])
        .to_pylist()
    )
    summary = {
        "old_report": old.uri,
        "new_report": new.uri,
        "old_models": old_models,
        "new_models": new_models,
        "same_model": old_models == new_models,
        "old_images": old_r.num_rows,
        "new_images": new_r.num_rows,
        "matched": counts[0],
        "scored_in_both": counts[1],
        "newly_flagged": counts[2],
        "cleared": counts[3],
        "flagged_in_both": counts[4],
        "old_flag_rate_matched": counts[5],
        "new_flag_rate_matched": counts[6],
        "spearman": None if spearman is None else float(spearman),
        "only_old": by_reason.get("only_old", 0),
        "only_new": by_reason.get("only_new", 0),
        "etag_changed": by_reason.get("etag_changed", 0),
        "top_changes": top,
        "seconds": time.perf_counter() - t0,
        "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return DiffResult(summary, changes, folders, unmatched)


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_diff(out: ObjectStore, result: DiffResult) -> str:
    """Write the Parquet files, then `diff.json` last; returns the URI of diff.json."""
    out.write_bytes("changes.parquet", _parquet(result.changes))
    out.write_bytes("folders.parquet", _parquet(result.folders))
    out.write_bytes("unmatched.parquet", _parquet(result.unmatched))
    text = json.dumps(result.summary, indent=2, allow_nan=False, default=float)
    return out.write_bytes("diff.json", text.encode() + b"\n").uri


def format_diff(result: DiffResult, top: int = 10) -> str:
    """A one-screen text summary: counts, Spearman, the largest flag changes, the folders that moved most."""
    s = result.summary
    lines = [
        f"old {s['old_report']} ({', '.join(s['old_models'])}): {s['old_images']} images",
        f"new {s['new_report']} ({', '.join(s['new_models'])}): {s['new_images']} images",
        f"matched (URI and etag) {s['matched']}, scored in both {s['scored_in_both']}; only old {s['only_old']}, "
        f"only new {s['only_new']}, file changed (etag) {s['etag_changed']}",
        f"flag changes: {s['newly_flagged']} newly flagged, {s['cleared']} cleared ({s['flagged_in_both']} flagged "
        f"in both); flag rate {_pct(s['old_flag_rate_matched'])} -> {_pct(s['new_flag_rate_matched'])}; "
        f"Spearman {_num(s['spearman'])}",
    ]
    if result.changes.num_rows:
        lines.append("")
        lines.append(f"{'direction':<14} {'old':>9} {'new':>9} {'rel chg':>8}  image")
        for r in result.changes.slice(0, top).to_pylist():
            lines.append(
                f"{r['direction']:<14} {r['old_score']:>9.4g} {r['new_score']:>9.4g} "
                f"{_num(r['rel_change'], '+.3f'):>8}  {r['image_uri']}"
            )
    if result.folders.num_rows:
        lines.append("")
        lines.append(f"{'old rate':>8} {'new rate':>8} {'change':>7} {'matched':>7}  folder")
        for r in result.folders.slice(0, top).to_pylist():
            lines.append(
                f"{_pct(r['old_flag_rate']):>8} {_pct(r['new_flag_rate']):>8} "
                f"{_num(r['flag_rate_change'], '+.1%'):>7} {r['matched']:>7}  {r['folder']}"
            )
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "n/a" if v is None else format(v, fmt)
