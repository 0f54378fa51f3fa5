"""Compaction: a finished run's small per-batch parts rewritten as a few large Parquet files.

The per-batch parts stay where they are and keep their role: a part is a batch's commit, the only
truth for exactly-once and resume. Compaction adds, for the readers (analytics, status, review,
mining, audit), large files holding the same rows:

    compact/c<NNNNN>.parquet   rows of consecutive parts in batch-id order (each part's rows in
                               its own order), row groups of ROW_GROUP rows, a file closed once it
                               passes target_bytes
    compact/manifest.json      written last: every file with the parts it covers, in order, and
                               each covered part's size and etag when it was read

Readers (`sources`) use the compacted files only while the manifest matches the parts exactly
(the same batch ids, sizes and etags); otherwise, e.g. a part rewritten after compaction, they read
the parts, so no row is ever read twice or stale. A crash during compaction leaves no manifest (or
the previous, still matching one): readers read the parts and a re-run compacts again. Compacting a
report whose manifest already matches does nothing (idempotent).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from patchaudit.store import reports
from patchaudit.store.objects import ObjectStore
from patchaudit.store.reports import (
    COMPACT_PREFIX,
    MANIFEST_KEY,
    MANIFEST_VERSION,
    manifest_matches,
    part_infos,
    read_manifest,
)

TARGET_BYTES = 64 << 20  # a compacted file closes once its size (pending rows counted uncompressed) passes this
ROW_GROUP = 65_536


def _read_ahead(store: ObjectStore, batch_ids: list[str], window: int = 8) -> Iterator[tuple[str, pa.Table]]:
    """(batch id, part) in order, with up to `window` parts read ahead in threads (reads of many
    small objects wait on storage; Arrow's reader releases the GIL). Memory: `window` parts."""
    with ThreadPoolExecutor(max_workers=window) as pool:
        ahead: deque[tuple[str, Future[pa.Table]]] = deque()
        for batch_id in batch_ids:
            ahead.append((batch_id, pool.submit(reports.read_part, store, batch_id)))
            if len(ahead) >= window:
                b, f = ahead.popleft()
                yield b, f.result()
        while ahead:
            b, f = ahead.popleft()
            yield b, f.result()


def compact(store: ObjectStore, target_bytes: int | None = None) -> dict[str, Any]:
    """Compact the report's committed parts (see the module's docstring); returns the manifest.

    Memory holds one part and one row group being written. Nothing is deleted.
    """
    target = target_bytes or TARGET_BYTES
    parts = part_infos(store)
    manifest = read_manifest(store)
    if manifest_matches(manifest, parts):
        assert manifest is not None
        return manifest
    files: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="patchaudit-compact-") as tmp:
        writer: pq.ParquetWriter | None = None
        path = ""
        current: dict[str, Any] = {}
        pending: list[pa.Table] = []
        pending_rows = pending_bytes = 0

        def flush_group() -> None:
            nonlocal pending, pending_rows, pending_bytes
            if pending and writer is not None:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
            pending, pending_rows, pending_bytes = [], 0, 0

        def close() -> None:
            nonlocal writer
            if writer is None:
                return
            flush_group()
            writer.close()
            writer = None
            current["bytes"] = store.write_file(current["key"], path).size
            os.unlink(path)
            files.append(dict(current))

        for batch_id, table in _read_ahead(store, sorted(parts)):
            if writer is None:
                key = f"{COMPACT_PREFIX}c{len(files):05d}.parquet"
                path = os.path.join(tmp, os.path.basename(key))
                writer = pq.ParquetWriter(path, reports.REPORT_SCHEMA, compression="zstd")
                current = {"key": key, "rows": 0, "bytes": 0, "parts": []}
            pending.append(table)
            pending_rows += table.num_rows
            pending_bytes += table.nbytes
            current["rows"] += table.num_rows
            current["parts"].append([batch_id, table.num_rows])
            if pending_rows >= ROW_GROUP:
                flush_group()
            # Written bytes plus the pending rows' Arrow size (uncompressed: files end at or below it).
            if os.path.getsize(path) + pending_bytes >= target:
                close()
        close()
    doc = {
        "version": MANIFEST_VERSION,
        "files": files,
        "rows": sum(f["rows"] for f in files),
        "covered": {b: [i.size, i.etag] for b, i in sorted(parts.items())},
    }
    # Last: until the manifest names them, the new files are invisible to readers.
    store.write_bytes(MANIFEST_KEY, json.dumps(doc, separators=(",", ":")).encode())
    named = {f["key"] for f in files}
    for info in store.list(COMPACT_PREFIX, extensions=".parquet"):  # an earlier, larger compaction's tail
        if info.key not in named:
            store.delete(info.key)
    return doc


def clear(store: ObjectStore) -> None:
    """Remove the compaction (manifest first, so readers never see a partial one)."""
    store.delete(MANIFEST_KEY)
    for info in store.list(COMPACT_PREFIX, extensions=".parquet"):
        store.delete(info.key)
