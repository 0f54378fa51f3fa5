"""`patchaudit export`: copy a selection of a report's images (and heatmaps) with a manifest for labelling tools.

The selection is a SQL predicate over the report's columns (plus `folder`, and `cluster` once
`patchaudit cluster` has run), checked by DuckDB before anything is written. The most anomalous
images come first (score descending, then URI), so `--limit` keeps the strongest.

Destination layout (a folder or an s3:// prefix):
    images/<hash>-<name>      the image, named by a hash of its URI (unique) and its own name (readable)
    heatmaps/<hash>.png       its heatmap overlay, when the report has one
    manifest.jsonl, manifest.csv   one line per exported image (written after the copies)
    export.json               the selection; status "copying" while files are copied, then "complete"

Idempotent and resumable: a file already at its destination with the expected size is not copied
again, so rerunning the same export (finished or killed) copies only what is missing and rewrites
the same manifest. A destination holding an export of another selection is refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from patchaudit.errors import MiningError, PatchauditError
from patchaudit.mining.cluster import read_clusters
from patchaudit.mining.reportio import Report, read_columns
from patchaudit.store.objects import ObjectStore, open_store, resolve

COLUMNS = [
    "image_uri",
    "size",
    "etag",
    "model_id",
    "score",
    "is_anomalous",
    "threshold",
    "map_max",
    "map_mean",
    "anomalous_area_fraction",
    "peak_x",
    "peak_y",
    "heatmap_uri",
    "error",
    "run_id",
]
MANIFEST_FIELDS = [
    "image",
    "heatmap",
    "source_uri",
    "score",
    "is_anomalous",
    "threshold",
    "cluster",
    "map_max",
    "peak_x",
    "peak_y",
    "anomalous_area_fraction",
    "etag",
    "model_id",
    "run_id",
]
EXPORT_JSON = "export.json"


@dataclass
class Selection:
    rows: list[dict[str, Any]]
    fingerprint: str
    spec: dict[str, Any]


def _connect() -> Any:
    import duckdb

    # The tables are handed over from Python; a predicate gets no file or network access.
    return duckdb.connect(config={"threads": 2, "enable_external_access": False})


def check_predicate(where: str) -> str:
    """The predicate as one SQL expression, or MiningError (empty, or more than one statement)."""
    import duckdb

    where = (where or "").strip()
    if not where:
        raise MiningError('--where is empty; give a SQL predicate, e.g. "score > 2 * threshold"')
    try:
        statements = duckdb.extract_statements(f"SELECT 1 FROM images WHERE ({where})")
    except duckdb.Error as exc:
        raise MiningError(f"--where {where!r} is not a valid SQL predicate: {_first_line(exc)}") from None
    if len(statements) != 1:
        raise MiningError(f"--where {where!r} must be one predicate, not several statements")
    return where


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def select(report: Report, where: str, cluster: int | None = None, limit: int | None = None) -> Selection:
    """The exported rows: the predicate (validated by DuckDB), the cluster, the limit; nothing written."""
    import duckdb

    where = check_predicate(where)
    if limit is not None and limit < 1:
        raise MiningError(f"--limit must be >= 1, got {limit}")
    table = read_columns(report, COLUMNS)
    clusters = read_clusters(report)
    if cluster is not None and clusters is None:
        raise MiningError(f"{report.uri} has no clusters; run `patchaudit cluster --report {report.uri}` first")
    if clusters is not None and cluster is not None:
        known = set(clusters["cluster"].to_pylist())
        if cluster not in known:
            raise MiningError(f"cluster {cluster} does not exist; clusters of this report: {sorted(known)}")
    con = _connect()
    con.register("report_rows", table)
    if clusters is None:
        clusters = pa.table({"image_uri": pa.array([], pa.string()), "cluster": pa.array([], pa.int32())})
    con.register("cluster_rows", clusters.select(["image_uri", "cluster"]))
    con.execute("""CREATE TEMP VIEW images AS
                   SELECT r.*, regexp_replace(r.image_uri, '/[^/]*$', '') AS folder, c.cluster
                   FROM report_rows r LEFT JOIN cluster_rows c USING (image_uri)""")
    sql = f"SELECT * FROM images WHERE ({where})"
    if cluster is not None:
        sql += f" AND cluster = {int(cluster)}"
    sql += " ORDER BY score DESC NULLS LAST, image_uri"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    try:
        con.execute(f"SELECT * FROM images WHERE ({where}) LIMIT 0")  # binds every name the predicate uses
        rows = con.execute(sql).to_arrow_table().to_pylist()
    except duckdb.Error as exc:
        raise MiningError(
            f"--where {where!r} is not a valid predicate over the report: {_first_line(exc)}; "
            f"columns: {', '.join(COLUMNS + ['folder', 'cluster'])}"
        ) from None
    finally:
        con.close()
    spec = {"report": report.uri, "where": where, "cluster": cluster, "limit": limit}
    fp = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return Selection(rows, fp, spec)


def _names(uri: str) -> tuple[str, str]:
    h = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = uri.rsplit("/", 1)[-1] or "image"
    return f"images/{h}-{name}", f"heatmaps/{h}.png"


def _copy(src_uri: str, dest: ObjectStore, key: str, expected_size: int | None) -> bool:
    """Copy one object unless it is already there (same size); returns True when it copied."""
    if dest.exists(key):
        if expected_size is None or dest.head(key).size == expected_size:
            return False
    store, k = resolve(src_uri)
    data = store.read_bytes(k)
    dest.write_bytes(key, data)
    return True


def run_export(sel: Selection, to_uri: str, threads: int = 8) -> dict[str, Any]:
    try:
        dest = open_store(to_uri)
        previous = json.loads(dest.read_bytes(EXPORT_JSON)) if dest.exists(EXPORT_JSON) else None
    except (PatchauditError, ValueError) as exc:
        raise MiningError(f"cannot use --to {to_uri}: {exc}") from None
    if previous and previous.get("fingerprint") != sel.fingerprint:
        raise MiningError(
            f"{dest.uri} holds another export ({previous.get('selection')}); export into an empty or new destination"
        )
    if not sel.rows:
        return {"destination": dest.uri, "selected": 0, "copied": 0, "skipped": 0, "failed": []}
    header = {"fingerprint": sel.fingerprint, "selection": sel.spec, "selected": len(sel.rows)}
    dest.write_bytes(EXPORT_JSON, json.dumps({**header, "status": "copying"}, indent=2).encode())
    t0 = time.perf_counter()

    def one(row: dict[str, Any]) -> tuple[dict[str, Any] | None, int, str | None]:
        img_key, heat_key = _names(row["image_uri"])
        copied = 0
        try:
            copied += _copy(row["image_uri"], dest, img_key, row["size"])
            heat = None
            if row["heatmap_uri"]:
                copied += _copy(row["heatmap_uri"], dest, heat_key, None)
                heat = heat_key
        except PatchauditError as exc:
            return None, copied, f"{row['image_uri']}: {exc}"
        entry = {
            "image": img_key,
            "heatmap": heat,
            "source_uri": row["image_uri"],
            **{f: row.get(f) for f in MANIFEST_FIELDS[3:]},
        }
        return entry, copied, None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(one, sel.rows))  # in selection order: the manifest is deterministic
    manifest = [e for e, _, _ in results if e is not None]
    failed = [f for _, _, f in results if f is not None]
    copied = sum(c for _, c, _ in results)
    jsonl = "".join(json.dumps(e, sort_keys=False) + "\n" for e in manifest)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(manifest)
    dest.write_bytes("manifest.jsonl", jsonl.encode())
    dest.write_bytes("manifest.csv", buf.getvalue().encode())
    status = "complete" if not failed else "incomplete"
    dest.write_bytes(
        EXPORT_JSON,
        json.dumps({**header, "status": status, "exported": len(manifest), "failed": failed[:100]}, indent=2).encode(),
    )
    return {
        "destination": dest.uri,
        "selected": len(sel.rows),
        "exported": len(manifest),
        "files_copied": copied,
        "failed": failed,
        "seconds": time.perf_counter() - t0,
    }
