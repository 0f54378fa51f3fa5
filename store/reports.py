"""Parquet reports: one part per batch, an input listing snapshot, a summary written last.

Layout under a report store (a prefix):
    parts/<batch_id>.parquet   one per batch; a retried batch overwrites its part, never duplicates
    compact/                   large files holding the parts' rows, for readers (store.compaction)
    listing.parquet            the input listing the run was planned from
    summary.json, _SUCCESS     written last, in that order; `_SUCCESS` means the report is complete
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from patchaudit.errors import StoreError
from patchaudit.store import listing as _listing
from patchaudit.store.listing import LISTING_KEY, LISTING_SCHEMA  # noqa: F401  (part of the report layout)
from patchaudit.store.objects import FileStore, ObjectInfo, ObjectStore

REPORT_SCHEMA_VERSION = "1"
PARTS_PREFIX = "parts/"
COMPACT_PREFIX = "compact/"
MANIFEST_KEY = "compact/manifest.json"
MANIFEST_VERSION = 1
SUMMARY_KEY = "summary.json"
SUCCESS_KEY = "_SUCCESS"

_BATCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ReportError(StoreError):
    """A report row, part, listing or summary is invalid or does not match its schema."""


def _field(name: str, type_: pa.DataType, nullable: bool) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


# One row per input image: scored (score set, error null) or failed (error set, score null).
REPORT_SCHEMA = pa.schema(
    [
        _field("run_id", pa.string(), False),
        _field("image_uri", pa.string(), False),
        _field("size", pa.int64(), False),
        _field("etag", pa.string(), False),
        _field("model_id", pa.string(), False),
        _field("score", pa.float64(), True),  # null on error
        _field("is_anomalous", pa.bool_(), True),  # null on error
        _field("threshold", pa.float64(), False),
        _field("map_max", pa.float64(), True),  # map columns: null for methods without a map
        _field("map_mean", pa.float64(), True),
        _field("anomalous_area_fraction", pa.float64(), True),
        _field("peak_x", pa.int32(), True),
        _field("peak_y", pa.int32(), True),
        _field("heatmap_uri", pa.string(), True),
        _field("error", pa.string(), True),
        _field("attempt", pa.int32(), False),
        _field("worker", pa.string(), False),
        _field("decode_ms", pa.float64(), True),  # timings: null when the stage did not run
        _field("feature_ms", pa.float64(), True),
        _field("knn_ms", pa.float64(), True),
    ],
    metadata={"patchaudit.report_schema_version": REPORT_SCHEMA_VERSION},
)

_INT_RANGES = {pa.int32(): (-(2**31), 2**31 - 1), pa.int64(): (-(2**63), 2**63 - 1)}


def check_batch_id(batch_id: object) -> str:
    """Return `batch_id` if it is a safe file name, else raise ReportError."""
    if not isinstance(batch_id, str) or not _BATCH_ID_RE.match(batch_id):
        raise ReportError(
            f"invalid batch id {batch_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return batch_id


def part_key(batch_id: str) -> str:
    return f"{PARTS_PREFIX}{check_batch_id(batch_id)}.parquet"


# ---------------------------------------------------------------- validation


def _check_value(field: pa.Field, value: Any, where: str) -> Any:
    """`value` as a plain Python value of `field`'s type; ReportError saying what is allowed."""
    if isinstance(value, np.generic):
        value = value.item()  # numpy scalars from the compute code
    if value is None:
        if not field.nullable:
            raise ReportError(f"{where}: column {field.name!r} is required (not nullable)")
        return None
    t = field.type
    if t == pa.string():
        if not isinstance(value, str):
            raise ReportError(f"{where}: column {field.name!r} must be a str, got {value!r}")
    elif t == pa.bool_():
        if not isinstance(value, bool):
            raise ReportError(f"{where}: column {field.name!r} must be a bool, got {value!r}")
    elif t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not ok or not lo <= value <= hi:
            raise ReportError(f"{where}: column {field.name!r} must be an int in [{lo}, {hi}], got {value!r}")
        value = int(value)
    elif t == pa.float64():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ReportError(f"{where}: column {field.name!r} must be a float, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ReportError(
                f"{where}: column {field.name!r} is {value}; NaN/inf are not stored, "
                "use None where the column is nullable or report an error"
            )
    return value


def check_row(row: Mapping[str, Any], where: str = "row") -> dict[str, Any]:
    """Validate one report row; missing nullable columns become None, unknown keys are errors."""
    if not isinstance(row, Mapping):
        raise ReportError(f"{where} must be a dict, got {type(row).__name__}")
    unknown = set(row) - set(REPORT_SCHEMA.names)
    if unknown:
        raise ReportError(
            f"{where} has unknown columns {sorted(map(str, unknown))}; valid columns: {REPORT_SCHEMA.names}"
        )
    out = {f.name: _check_value(f, row.get(f.name), where) for f in REPORT_SCHEMA}
    if out["error"] is None:
        if out["score"] is None or out["is_anomalous"] is None:
            raise ReportError(f"{where}: a row without 'error' needs 'score' and 'is_anomalous'")
    else:
        if not out["error"]:
            raise ReportError(f"{where}: 'error' must be a non-empty reason or None")
        if out["score"] is not None or out["is_anomalous"] is not None:
            raise ReportError(f"{where}: a row with 'error' must have score and is_anomalous None")
    return out


# ---------------------------------------------------------------- parquet bytes


def _to_parquet(table: pa.Table) -> bytes:
    # An Arrow buffer stream: the writer's pages are copied in C++ (a Python file object such as
    # io.BytesIO is called back through Python for every write, a quarter of a small part's cost).
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _from_parquet(store: ObjectStore, key: str, schema: pa.Schema) -> pa.Table:
    data = store.read_bytes(key)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise ReportError(f"{store.uri_for(key)} is not a readable Parquet file: {e}") from e
    if not table.schema.equals(schema, check_metadata=False):
        raise ReportError(
            f"{store.uri_for(key)} does not match the expected schema:\n{table.schema}\nexpected:\n{schema}"
        )
    return table.replace_schema_metadata(schema.metadata)


# ---------------------------------------------------------------- parts


_PLAIN_TYPES: dict[pa.DataType, tuple[type, ...]] = {
    pa.string(): (str,),
    pa.bool_(): (bool,),
    pa.int32(): (int,),
    pa.int64(): (int,),
    pa.float64(): (float, int),
}


def _plain_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]] | None:
    """`rows` as columns if they pass every rule of `check_row` with values of exactly their column's
    Python type (what the workers build), checked a column at a time; None when any row needs a closer
    look (numpy scalars to convert, or something wrong): then `check_row` runs row by row and says what."""
    allowed = set(REPORT_SCHEMA.names)
    if not all(type(r) is dict and r.keys() <= allowed for r in rows):
        return None
    cols: dict[str, list[Any]] = {}
    for f in REPORT_SCHEMA:
        col = [r.get(f.name) for r in rows]
        values = [v for v in col if v is not None]
        if len(values) < len(col) and not f.nullable:
            return None
        ok_types = _PLAIN_TYPES.get(f.type, ())
        if not all(type(v) in ok_types for v in values):
            return None
        if f.type in _INT_RANGES and values:
            lo, hi = _INT_RANGES[f.type]
            if not lo <= min(values) <= hi or not lo <= max(values) <= hi:
                return None
        if f.type == pa.float64() and not all(map(math.isfinite, values)):
            return None
        cols[f.name] = col
    for error, score, flag in zip(cols["error"], cols["score"], cols["is_anomalous"]):
        if (score is None or flag is None) if error is None else (not error or score is not None or flag is not None):
            return None
    return cols


def write_part(store: ObjectStore, batch_id: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Validate `rows` and write them as `parts/<batch_id>.parquet`; returns the part's URI."""
    key = part_key(batch_id)
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise ReportError(f"rows for batch {batch_id!r} must be a list of dicts")
    try:
        cols = _plain_columns(rows)
    except (TypeError, ValueError, OverflowError):  # e.g. an int too large for a float: the slow path says so
        cols = None
    if cols is not None and len(set(cols["image_uri"])) == len(rows):
        table = pa.table(cols, schema=REPORT_SCHEMA)
        return store.write_bytes(key, _to_parquet(table)).uri
    checked = [check_row(r, f"batch {batch_id!r} row {i}") for i, r in enumerate(rows)]
    seen: set[str] = set()
    for i, r in enumerate(checked):
        if r["image_uri"] in seen:
            raise ReportError(
                f"batch {batch_id!r} row {i}: image {r['image_uri']!r} appears twice; each image has exactly one row"
            )
        seen.add(r["image_uri"])
    table = pa.Table.from_pylist(checked, schema=REPORT_SCHEMA)
    return store.write_bytes(key, _to_parquet(table)).uri


def list_parts(store: ObjectStore) -> list[str]:
    """Batch ids that have a part, sorted."""
    ids = []
    for info in store.list(PARTS_PREFIX, extensions=".parquet"):
        name = info.key[len(PARTS_PREFIX) :]
        stem = name[: -len(".parquet")]
        if name.endswith(".parquet") and _BATCH_ID_RE.match(stem):  # skips nested and stray keys
            ids.append(stem)
    return ids


def read_part(store: ObjectStore, batch_id: str) -> pa.Table:
    return _from_parquet(store, part_key(batch_id), REPORT_SCHEMA)


def read_report(store: ObjectStore) -> pa.Table:
    """Every committed row once (compacted files when they match the parts, else the parts),
    sorted by image_uri (an empty table when there are none). Small reports: this is one table."""
    tables = list(iter_tables(store))
    if not tables:
        return REPORT_SCHEMA.empty_table()
    return (
        pa.concat_tables(tables).sort_by("image_uri").combine_chunks().replace_schema_metadata(REPORT_SCHEMA.metadata)
    )


# ---------------------------------------------------------------- compacted files (see store.compaction)


@dataclass(frozen=True)
class Sources:
    """What a reader reads to see every committed row once: compacted files, then uncovered parts."""

    compacted: list[dict[str, Any]]  # manifest entries: {"key", "rows", "bytes", "parts": [[batch_id, rows], ...]}
    parts: list[str]  # batch ids of parts no compacted file covers

    @property
    def batch_ids(self) -> list[str]:
        return sorted([b for f in self.compacted for b, _ in f["parts"]] + self.parts)


def part_infos(store: ObjectStore) -> dict[str, ObjectInfo]:
    ids = set(list_parts(store))
    return {
        i.key[len(PARTS_PREFIX) : -len(".parquet")]: i
        for i in store.list(PARTS_PREFIX, extensions=".parquet")
        if i.key[len(PARTS_PREFIX) : -len(".parquet")] in ids
    }


def read_manifest(store: ObjectStore) -> dict[str, Any] | None:
    if not store.exists(MANIFEST_KEY):
        return None
    try:
        doc = json.loads(store.read_bytes(MANIFEST_KEY))
    except ValueError:
        return None  # unreadable: ignored, the parts are read (and a re-compaction rewrites it)
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION or not isinstance(doc.get("files"), list):
        return None
    return doc


def manifest_matches(manifest: dict[str, Any] | None, parts: dict[str, ObjectInfo]) -> bool:
    if manifest is None:
        return False
    covered = manifest.get("covered", {})
    if set(covered) != set(parts):
        return False
    return all([parts[b].size, parts[b].etag] == covered[b] for b in parts)


def sources(store: ObjectStore) -> Sources:
    """The files to read for every committed row exactly once (compacted files preferred)."""
    parts = part_infos(store)
    manifest = read_manifest(store)
    if manifest_matches(manifest, parts):
        assert manifest is not None
        return Sources(list(manifest["files"]), [])
    return Sources([], sorted(parts))


def _local_copy(store: ObjectStore, key: str, tmpdir: str) -> str:
    if isinstance(store, FileStore):
        return os.path.join(store.root, key)
    path = os.path.join(tmpdir, os.path.basename(key))
    with open(path, "wb") as out, store.open_read(key) as src:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    return path


def iter_batches(store: ObjectStore, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(batch id, its rows) for every committed batch, each once, one part's rows in memory at a time
    (compacted files are read one row group at a time and split at the parts' boundaries)."""
    src = sources(store)
    with tempfile.TemporaryDirectory(prefix="patchaudit-compact-") as tmp:
        for f in src.compacted:
            path = _local_copy(store, f["key"], tmp)
            pf = pq.ParquetFile(path)
            groups = (pf.read_row_group(i, columns=columns) for i in range(pf.num_row_groups))
            buf: pa.Table | None = None
            for batch_id, rows in f["parts"]:
                while buf is None or buf.num_rows < rows:
                    nxt = next(groups)
                    buf = nxt if buf is None else pa.concat_tables([buf, nxt])
                yield batch_id, buf.slice(0, rows)
                buf = buf.slice(rows)
            if not isinstance(store, FileStore):
                os.unlink(path)
    for batch_id in src.parts:
        table = read_part(store, batch_id)
        yield batch_id, table.select(columns) if columns else table


def iter_tables(store: ObjectStore, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The report's rows in bounded pieces (a compacted row group or a part at a time)."""
    src = sources(store)
    with tempfile.TemporaryDirectory(prefix="patchaudit-compact-") as tmp:
        for f in src.compacted:
            path = _local_copy(store, f["key"], tmp)
            pf = pq.ParquetFile(path)
            for i in range(pf.num_row_groups):
                yield pf.read_row_group(i, columns=columns)
            if not isinstance(store, FileStore):
                os.unlink(path)
    for batch_id in src.parts:
        table = read_part(store, batch_id)
        yield table.select(columns) if columns else table


# ---------------------------------------------------------------- listing


def write_listing(store: ObjectStore, infos: Iterable[ObjectInfo]) -> str:
    """Snapshot the input listing as `listing.parquet` (written in row groups); returns its URI."""
    sp = _listing.ListingSpool()
    try:
        sp.extend(infos)
        return sp.commit(store)
    except _listing.ListingError as e:
        raise ReportError(str(e)) from None
    finally:
        sp.discard()


def read_listing(store: ObjectStore) -> list[ObjectInfo]:
    """The whole snapshot as a list (small listings only: runs stream it, see store.listing)."""
    with _listing.local_listing(store) as path:
        return list(_listing.iter_infos(path, store.uri_for(LISTING_KEY)))


# ---------------------------------------------------------------- summary


def write_summary(store: ObjectStore, summary: Mapping[str, Any]) -> str:
    """Write `summary.json`, then `_SUCCESS` (last: readers trust the summary only after it)."""
    if not isinstance(summary, Mapping):
        raise ReportError(f"summary must be a dict, got {type(summary).__name__}")
    try:
        text = json.dumps(dict(summary), indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ReportError(f"summary is not plain JSON (str, int, finite float, bool, None, list, dict): {e}") from e
    uri = store.write_bytes(SUMMARY_KEY, text.encode("utf-8") + b"\n").uri
    store.write_bytes(SUCCESS_KEY, b"")
    return uri


def read_summary(store: ObjectStore) -> dict[str, Any]:
    try:
        summary = json.loads(store.read_bytes(SUMMARY_KEY))
    except ValueError as e:
        raise ReportError(f"{store.uri_for(SUMMARY_KEY)} is not valid JSON: {e}") from e
    if not isinstance(summary, dict):
        raise ReportError(f"{store.uri_for(SUMMARY_KEY)} must hold a JSON object")
    return summary


def is_complete(store: ObjectStore) -> bool:
    return store.exists(SUCCESS_KEY)


def clear_complete(store: ObjectStore) -> None:
    """Remove `_SUCCESS` before changing a finished report (e.g. re-running a batch)."""
    store.delete(SUCCESS_KEY)
