"""A run's listing snapshot as the workers see it: one batch's rows at a time, in bounded memory.

The plan cuts batch `b<n>` from listing rows [n*B, (n+1)*B) (B: `run.json`'s batch size), so a
worker reads only that slice of `listing.parquet` (one row group cached) instead of holding the
whole listing, and a message may only name the images of its batch's slice.
"""

from __future__ import annotations

import json
import re
import weakref
from contextlib import ExitStack

from patchaudit.store import listing as listings
from patchaudit.store.objects import ObjectInfo, ObjectStore

_BATCH_RE = re.compile(r"b(\d{6,})")


class BatchListing:
    def __init__(self, report: ObjectStore) -> None:
        stack = ExitStack()
        path = stack.enter_context(listings.local_listing(report))
        # A temporary copy (S3 reports) is removed with this object, or at exit at the latest.
        self._cleanup = weakref.finalize(self, stack.close)
        self.slices = listings.ListingSlices(path, report.uri_for(listings.LISTING_KEY))
        self.batch_size = int(json.loads(report.read_bytes("run.json"))["batch_size"])

    def infos(self, batch_id: str, keys: list[str]) -> dict[str, ObjectInfo]:
        """The listed images of batch `batch_id` by key; LookupError unless `keys` are exactly them."""
        m = _BATCH_RE.fullmatch(batch_id)
        planned = self.slices.slice(int(m[1]) * self.batch_size, self.batch_size) if m else []
        by_key = {i.key: i for i in planned}
        unknown = [k for k in keys if k not in by_key]
        if unknown:
            raise LookupError(
                f"batch names {len(unknown)} key(s) that are not in the run's listing snapshot (its rows "
                f"for batch {batch_id}), e.g. {unknown[0]!r}; a message may only name its batch's listed images"
            )
        return {k: by_key[k] for k in keys}
