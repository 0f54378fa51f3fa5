"""The audit ledger of a product line: which image versions its reports already hold, per model.

It lives in the line's report root, next to the passes it describes, as Parquet (no Redis):

    <report root>/<date>/pass-NNN/     one report per audit pass (store.reports layout)
    <report root>/ledger/<date>.pass-NNN.parquet
                                       one part per finished pass: image_uri, etag, model_id, pass, error

A part is written only after its pass is complete (`_SUCCESS`), from the pass's own rows, so the
ledger never claims an image a report does not hold; a part lost to a crash is rebuilt from the
report (`record_pass` is idempotent). The check "which listed images still need scoring" is one
anti-join in pyarrow, with no Python loop over rows.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from patchaudit.store import reports
from patchaudit.store.objects import ObjectInfo, ObjectStore

LEDGER_PREFIX = "ledger/"
PASS_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})/pass-(\d{3,})$")

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("pass", pa.string(), nullable=False),  # "<date>/pass-NNN", the report prefix under the root
        pa.field("error", pa.bool_(), nullable=False),  # the row is an error row (kept: the image is accounted for)
    ]
)


class LedgerError(reports.ReportError):
    """A ledger part is unreadable or does not match the ledger schema."""


def pass_name(date: str, number: int) -> str:
    return f"{date}/pass-{number:03d}"


def part_key(pass_: str) -> str:
    if not PASS_RE.match(pass_):
        raise LedgerError(f"invalid pass name {pass_!r}; expected YYYY-MM-DD/pass-NNN")
    return f"{LEDGER_PREFIX}{pass_.replace('/', '.')}.parquet"


def recorded_passes(root: ObjectStore) -> list[str]:
    """Passes that have a ledger part, in (date, number) order."""
    out = []
    for info in root.list(LEDGER_PREFIX, extensions=".parquet"):
        stem = info.key[len(LEDGER_PREFIX) : -len(".parquet")]
        name = stem.replace(".", "/", 1)
        m = PASS_RE.match(name)
        if m:
            out.append((m.group(1), int(m.group(2)), name))
    return [name for _, _, name in sorted(out)]


def has_pass(root: ObjectStore, pass_: str) -> bool:
    return root.exists(part_key(pass_))


def ledger_rows(report: pa.Table, pass_: str) -> pa.Table:
    """A finished report's rows as ledger rows (columnar; no loop over rows)."""
    n = report.num_rows
    return pa.table(
        {
            "image_uri": report["image_uri"],
            "etag": report["etag"],
            "model_id": report["model_id"],
            "pass": pa.array([pass_] * n, pa.string()) if n else pa.array([], pa.string()),
            "error": pc.is_valid(report["error"]),
        },
        schema=LEDGER_SCHEMA,
    )


def write_part(root: ObjectStore, pass_: str, rows: pa.Table) -> str:
    sink = io.BytesIO()
    pq.write_table(rows.cast(LEDGER_SCHEMA), sink, compression="zstd")
    return root.write_bytes(part_key(pass_), sink.getvalue()).uri


def record_pass(root: ObjectStore, pass_: str) -> int:
    """Write the ledger part of a complete pass from its report; returns its row count."""
    report_store = root.child(pass_)
    if not reports.is_complete(report_store):
        raise LedgerError(f"{report_store.uri} is not complete (no _SUCCESS); it cannot enter the ledger")
    table = reports.read_report(report_store)
    write_part(root, pass_, ledger_rows(table, pass_))
    return table.num_rows


def read_ledger(root: ObjectStore, model_id: str | None = None) -> pa.Table:
    """Every ledger row of the line (only `model_id`'s when given)."""
    tables = []
    for pass_ in recorded_passes(root):
        key = part_key(pass_)
        try:
            t = pq.read_table(pa.BufferReader(root.read_bytes(key)))
        except (pa.ArrowException, OSError) as exc:
            raise LedgerError(f"{root.uri_for(key)} is not a readable Parquet file: {exc}") from exc
        if not t.schema.equals(LEDGER_SCHEMA, check_metadata=False):
            raise LedgerError(f"{root.uri_for(key)} does not match the ledger schema:\n{t.schema}")
        if model_id is not None:
            t = t.filter(pc.equal(t["model_id"], model_id))
        tables.append(t)
    if not tables:
        return LEDGER_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def listing_table(infos: Sequence[ObjectInfo]) -> pa.Table:
    return pa.table(
        {
            "image_uri": [i.uri for i in infos],
            "etag": [i.etag for i in infos],
            "_i": pa.array(range(len(infos)), pa.int64()),
        }
    )


def unscored(infos: Sequence[ObjectInfo], ledger: pa.Table) -> list[ObjectInfo]:
    """The listed objects whose (uri, etag) the ledger does not hold, in listing order.

    Pass a ledger already filtered to one model: an image scored only by another model is unscored.
    """
    if not infos:
        return []
    left = listing_table(infos)
    right = ledger.select(["image_uri", "etag"])
    todo = left.join(right, keys=["image_uri", "etag"], join_type="left anti", use_threads=True)
    return [infos[i] for i in sorted(todo["_i"].to_pylist())]
