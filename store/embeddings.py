"""Mining embeddings stored with a report: `embeddings/<batch_id>.parquet`, one per batch.

A batch's embeddings part is written BEFORE its report part. The report part is the commit: a reader
takes the embeddings of batch ids that have a report part and ignores any other (a batch that died
between the two writes is retried and overwrites its embeddings part; nothing is duplicated).

Columns: image_uri, pooled (fixed-size list of float16), peak (the same, null for methods without an
anomaly map). The file's metadata carries the embedding space (workers.embeddings.embedding_space):
vectors of two reports are comparable only when their spaces are equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from patchaudit.store.objects import ObjectStore
from patchaudit.store.reports import ReportError, check_batch_id, list_parts

EMBEDDINGS_PREFIX = "embeddings/"
EMBEDDINGS_VERSION = "1"
SPACE_META = b"patchaudit.embedding_space"
VERSION_META = b"patchaudit.embeddings_version"


def embeddings_key(batch_id: str) -> str:
    return f"{EMBEDDINGS_PREFIX}{check_batch_id(batch_id)}.parquet"


def embeddings_schema(dim: int, space: str) -> pa.Schema:
    vec = pa.list_(pa.float16(), dim)
    return pa.schema(
        [pa.field("image_uri", pa.string(), False), pa.field("pooled", vec, False), pa.field("peak", vec, True)],
        metadata={SPACE_META: space.encode(), VERSION_META: EMBEDDINGS_VERSION.encode()},
    )


def _vectors(a: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(a, dtype=np.float16).reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def embeddings_table(uris: Sequence[str], pooled: np.ndarray, peak: np.ndarray | None, space: str) -> pa.Table:
    """A validated embeddings table: pooled (N, D), peak (N, D) or None."""
    pooled = np.asarray(pooled)
    if pooled.ndim != 2 or pooled.shape[0] != len(uris) or pooled.shape[1] < 1:
        raise ReportError(f"pooled embeddings must be ({len(uris)}, D), got {pooled.shape}")
    n, dim = pooled.shape
    if not space:
        raise ReportError("an embeddings table needs its embedding space")
    cols = {"image_uri": pa.array(list(uris), pa.string()), "pooled": _vectors(pooled, dim)}
    if peak is None:
        cols["peak"] = pa.nulls(n, pa.list_(pa.float16(), dim))
    else:
        peak = np.asarray(peak)
        if peak.shape != pooled.shape:
            raise ReportError(f"peak embeddings must have the pooled shape {pooled.shape}, got {peak.shape}")
        cols["peak"] = _vectors(peak, dim)
    if not (np.isfinite(pooled).all() and (peak is None or np.isfinite(peak).all())):
        raise ReportError("embeddings hold NaN or inf")
    return pa.table(cols, schema=embeddings_schema(dim, space))


def write_embeddings(store: ObjectStore, batch_id: str, table: pa.Table) -> str:
    """Write one batch's embeddings part (before the batch's report part); returns its URI."""
    sink = pa.BufferOutputStream()  # written in C++, not through a Python file object (store.reports)
    pq.write_table(table, sink, compression="zstd")
    return store.write_bytes(embeddings_key(batch_id), sink.getvalue().to_pybytes()).uri


@dataclass(frozen=True)
class Embeddings:
    """Embeddings of a report's committed batches, in a stable order (batch id, then row)."""

    space: str
    uris: list[str]
    pooled: np.ndarray  # (N, D) float16
    peak: np.ndarray | None  # (N, D) float16; rows of images without a peak are NaN; None if no row has one

    def __len__(self) -> int:
        return len(self.uris)


def list_embedding_parts(store: ObjectStore) -> list[str]:
    """Batch ids with an embeddings part AND a report part (the report part is the commit)."""
    committed = set(list_parts(store))
    ids = []
    for info in store.list(EMBEDDINGS_PREFIX, extensions=".parquet"):
        stem = info.key[len(EMBEDDINGS_PREFIX) : -len(".parquet")]
        if stem in committed:
            ids.append(stem)
    return sorted(ids)


def read_embeddings_part(store: ObjectStore, batch_id: str) -> pa.Table:
    key = embeddings_key(batch_id)
    try:
        table = pq.read_table(pa.BufferReader(store.read_bytes(key)))
    except (pa.ArrowException, OSError) as e:
        raise ReportError(f"{store.uri_for(key)} is not a readable Parquet file: {e}") from e
    meta = table.schema.metadata or {}
    if SPACE_META not in meta or table.schema.names != ["image_uri", "pooled", "peak"]:
        raise ReportError(f"{store.uri_for(key)} is not an embeddings part (columns image_uri, pooled, peak)")
    return table


def read_embeddings(store: ObjectStore, batch_ids: Iterable[str] | None = None) -> Embeddings | None:
    """All committed embeddings of a report; None when the report has none (run with embeddings off)."""
    ids = list_embedding_parts(store) if batch_ids is None else list(batch_ids)
    tables = [read_embeddings_part(store, b) for b in ids]
    if not tables:
        return None
    spaces = {t.schema.metadata[SPACE_META].decode() for t in tables}
    if len(spaces) != 1:
        raise ReportError(f"{store.uri} holds embeddings of more than one space: {sorted(spaces)}")
    dims = {t.schema.field("pooled").type.list_size for t in tables}
    if len(dims) != 1:
        raise ReportError(f"{store.uri} holds embeddings of different sizes: {sorted(dims)}")
    (dim,) = dims
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    pooled = _to_numpy(table["pooled"], dim)
    peak = None
    if table["peak"].null_count < table.num_rows:
        peak = _to_numpy(table["peak"], dim)
    return Embeddings(spaces.pop(), table["image_uri"].to_pylist(), pooled, peak)


def _to_numpy(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """(N, D) float16; null rows become NaN."""
    arr = column.combine_chunks()
    # A fixed-size list keeps `dim` child slots for every row, null rows included.
    values = arr.values.slice(arr.offset * dim, len(arr) * dim)
    out = values.fill_null(np.float16("nan")).to_numpy(zero_copy_only=False).reshape(-1, dim)
    if arr.null_count:
        out = out.copy()
        out[arr.is_null().to_numpy(zero_copy_only=False)] = np.float16("nan")
    return out
