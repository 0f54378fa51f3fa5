"""Reading reports for the mining commands: committed parts only, the columns asked for, clear errors.

A report is a prefix written by `patchaudit score`; its parts (`parts/<batch_id>.parquet`) are the
truth. A prefix without parts is not a report: every command says so in one line instead of
working on nothing. A report still being written is readable (its finished batches).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from patchaudit.errors import MiningError, PatchauditError
from patchaudit.store import reports
from patchaudit.store.objects import FileStore, ObjectStore, open_store

MINING_PREFIX = "mining/"


@dataclass
class Report:
    store: ObjectStore
    batch_ids: list[str]  # every committed batch
    sources: reports.Sources | None = None  # what to read: compacted files (when they match) or parts

    @property
    def uri(self) -> str:
        return self.store.uri

    def summary(self) -> dict[str, Any] | None:
        """The summary written last by `score`; None while the report is unfinished."""
        if not reports.is_complete(self.store):
            return None
        try:
            return reports.read_summary(self.store)
        except PatchauditError:
            return None

    def model_uri(self) -> str | None:
        """Where the report's model lives: the run plan (distributed) or the summary (single process)."""
        for key in ("run.json", reports.SUMMARY_KEY):
            try:
                if self.store.exists(key):
                    uri = json.loads(self.store.read_bytes(key)).get("model_uri")
                    if uri:
                        return str(uri)
            except (PatchauditError, ValueError):
                continue
        return None


def open_report(uri: str, what: str = "report") -> Report:
    """The report at `uri`, or MiningError when there is none (no committed part)."""
    try:
        store = open_store(uri)
        sources = reports.sources(store)
    except PatchauditError as exc:
        raise MiningError(f"cannot open {what} {uri}: {exc}") from None
    batch_ids = sources.batch_ids
    if not batch_ids:
        raise MiningError(
            f"no report at {store.uri}: it holds no parts/*.parquet (a report is the prefix written by "
            "`patchaudit score --report`)"
        )
    return Report(store, batch_ids, sources)


def read_columns(report: Report, columns: Sequence[str], threads: int = 8) -> pa.Table:
    """The named report columns of every committed row, once: the compacted files when they match the
    parts (store.compaction), else the parts (read in parallel threads)."""
    unknown = [c for c in columns if c not in reports.REPORT_SCHEMA.names]
    if unknown:
        raise MiningError(f"unknown report column(s) {unknown}; columns: {reports.REPORT_SCHEMA.names}")
    schema = pa.schema([reports.REPORT_SCHEMA.field(c) for c in columns])

    src = report.sources or reports.Sources([], report.batch_ids)
    keys = [f["key"] for f in src.compacted] + [reports.part_key(b) for b in src.parts]

    def one(key: str) -> pa.Table:
        try:
            table = pq.read_table(pa.BufferReader(report.store.read_bytes(key)), columns=list(columns))
        except (pa.ArrowException, OSError) as exc:
            raise MiningError(f"{report.store.uri_for(key)} is not a readable report part: {exc}") from None
        except PatchauditError as exc:
            raise MiningError(f"cannot read {report.store.uri_for(key)}: {exc}") from None
        if not table.schema.equals(schema, check_metadata=False):
            raise MiningError(f"{report.store.uri_for(key)} does not have the report schema")
        return table.replace_schema_metadata(None)

    if isinstance(report.store, FileStore):  # local parts: one multithreaded Arrow scan over the committed files
        import pyarrow.dataset as ds

        paths = [os.path.join(report.store.root, k) for k in keys]
        try:
            table = ds.dataset(paths, format="parquet", schema=schema).to_table(columns=list(columns))
        except (pa.ArrowException, OSError) as exc:
            raise MiningError(f"{report.uri} holds a part that is not a readable report part: {exc}") from None
        return table.combine_chunks()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        tables = list(pool.map(one, keys))
    return pa.concat_tables(tables).combine_chunks()


def model_ids(table: pa.Table) -> list[str]:
    import pyarrow.compute as pc

    return sorted(pc.unique(table["model_id"]).to_pylist())
