"""The input listing snapshot (`listing.parquet`), written and read in bounded memory.

A run's listing can hold tens of millions of images, so it never exists as one Python list:

    ListingSpool   writes ObjectInfo rows into a local Parquet file in row groups of ROW_GROUP rows
                   as they are listed; `commit` uploads it into the report as `listing.parquet`.
    local_listing  a local path of a report's snapshot (the file itself on a FileStore, else a
                   temporary copy streamed from the store).
    iter_infos     the snapshot's rows in order, one row group at a time.
    ListingSlices  rows [start, start + n) by position (one cached row group): batch n of a run
                   cut at batch size B holds rows [n*B, (n+1)*B), so a worker or the scheduler reads
                   just its batch's rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq

from patchaudit.errors import StoreError
from patchaudit.store.objects import FileStore, ObjectInfo, ObjectStore

LISTING_KEY = "listing.parquet"
ROW_GROUP = 65_536  # rows per row group: ~15 MB of Arrow memory for typical keys, one read per slice

LISTING_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
    ],
    metadata={"patchaudit.report_schema_version": "1"},
)


class ListingError(StoreError):
    """A listing snapshot is unreadable, does not match its schema, or an entry is not an ObjectInfo."""


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ListingSpool:
    """A listing being written to a local Parquet file, row group by row group (bounded memory).

    Add entries with `add`/`extend`, then `close()`; `commit(store)` uploads it. The local file is
    removed when the spool is garbage collected (or by `discard`).
    """

    def __init__(self, row_group: int = ROW_GROUP) -> None:
        fd, self.path = tempfile.mkstemp(prefix="patchaudit-listing-", suffix=".parquet")
        os.close(fd)
        self._cleanup = weakref.finalize(self, _remove, self.path)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.path, LISTING_SCHEMA, compression="zstd")
        self._row_group = row_group
        self._buf: list[ObjectInfo] = []
        self.count = 0

    def add(self, info: ObjectInfo) -> None:
        if not isinstance(info, ObjectInfo):
            raise ListingError(f"listing entry {self.count} must be an ObjectInfo, got {type(info).__name__}")
        self._buf.append(info)
        self.count += 1
        if len(self._buf) >= self._row_group:
            self._flush()

    def extend(self, infos: Iterable[ObjectInfo]) -> None:
        for info in infos:
            self.add(info)

    def _flush(self) -> None:
        if not self._buf or self._writer is None:
            return
        buf, self._buf = self._buf, []
        try:
            batch = pa.record_batch(
                [
                    pa.array([i.key for i in buf], pa.string()),
                    pa.array([i.size for i in buf], pa.int64()),
                    pa.array([i.etag for i in buf], pa.string()),
                    pa.array([i.uri for i in buf], pa.string()),
                ],
                schema=LISTING_SCHEMA,
            )
        except (pa.ArrowException, TypeError) as e:
            raise ListingError(f"listing does not fit {LISTING_SCHEMA}: {e}") from e
        self._writer.write_batch(batch, row_group_size=self._row_group)

    def close(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None

    def commit(self, store: ObjectStore, key: str = LISTING_KEY) -> str:
        """Upload the (closed) spool as `key` of `store`; returns its URI."""
        self.close()
        return store.write_file(key, self.path).uri

    def discard(self) -> None:
        self.close()
        self._cleanup()


def spool(infos: Iterable[ObjectInfo]) -> ListingSpool:
    out = ListingSpool()
    out.extend(infos)
    out.close()
    return out


@contextmanager
def local_listing(store: ObjectStore, key: str = LISTING_KEY) -> Iterator[str]:
    """A local path of `store`'s snapshot: the file itself on a FileStore, else a temporary copy."""
    if isinstance(store, FileStore):
        store.head(key)  # missing -> StoreError naming the object
        yield os.path.join(store.root, key)
        return
    fd, path = tempfile.mkstemp(prefix="patchaudit-listing-", suffix=".parquet")
    try:
        with os.fdopen(fd, "wb") as out, store.open_read(key) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        yield path
    finally:
        _remove(path)


def open_file(path: str, uri: str) -> pq.ParquetFile:
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ListingError(f"{uri} is not a readable Parquet file: {e}") from e
    if not f.schema_arrow.equals(LISTING_SCHEMA, check_metadata=False):
        raise ListingError(f"{uri} does not match the listing schema:\n{f.schema_arrow}\nexpected:\n{LISTING_SCHEMA}")
    return f


def _infos(table: pa.Table | pa.RecordBatch) -> list[ObjectInfo]:
    cols = table.to_pydict()
    return [ObjectInfo(*t) for t in zip(cols["key"], cols["size"], cols["etag"], cols["uri"])]


def iter_infos(path: str, uri: str = "") -> Iterator[ObjectInfo]:
    """Every row of the snapshot at `path`, in order, one row group in memory at a time."""
    f = open_file(path, uri or path)
    for i in range(f.num_row_groups):
        yield from _infos(f.read_row_group(i))


def iter_keys(path: str, uri: str = "") -> Iterator[list[str]]:
    """The snapshot's keys in order, a row group's worth (a list) at a time."""
    f = open_file(path, uri or path)
    for i in range(f.num_row_groups):
        yield f.read_row_group(i, columns=["key"]).column(0).to_pylist()


def count(path: str, uri: str = "") -> int:
    return open_file(path, uri or path).metadata.num_rows


class ListingSlices:
    """Rows of a snapshot by position, reading one row group at a time (the last one is cached).

    Batches are claimed roughly in order, so consecutive slices mostly hit the cached group.
    """

    def __init__(self, path: str, uri: str = "") -> None:
        self._file = open_file(path, uri or path)
        meta = self._file.metadata
        self.rows = meta.num_rows
        self._starts = [0]
        for i in range(meta.num_row_groups):
            self._starts.append(self._starts[-1] + meta.row_group(i).num_rows)
        self._cached: tuple[int, pa.Table] | None = None

    def _group(self, i: int) -> pa.Table:
        if self._cached is None or self._cached[0] != i:
            self._cached = (i, self._file.read_row_group(i))
        return self._cached[1]

    def slice(self, start: int, n: int) -> list[ObjectInfo]:
        """Rows [start, start + n) (fewer at the end of the listing; none past it)."""
        out: list[ObjectInfo] = []
        pos, end = max(0, start), min(self.rows, start + n)
        g = 0
        while pos < end:
            while self._starts[g + 1] <= pos:
                g += 1
            table = self._group(g)
            lo = pos - self._starts[g]
            take = min(end, self._starts[g + 1]) - pos
            out.extend(_infos(table.slice(lo, take)))
            pos += take
        return out
