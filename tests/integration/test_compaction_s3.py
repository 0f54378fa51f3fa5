"""The streamed listing, compaction and the bounded finish on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import uuid

import pytest

from patchaudit.scheduler.finish import finish_report
from patchaudit.scheduler.plan import batch_id, commit_plan, prepare_plan
from patchaudit.store import compaction, reports
from patchaudit.store.batch_listing import BatchListing
from patchaudit.store.objects import ObjectInfo, open_store

pytestmark = pytest.mark.integration

BATCH = 3


@pytest.fixture
def report(s3_env):
    bucket = s3_env.make_bucket(f"pa-{uuid.uuid4().hex[:12]}")
    return open_store(f"s3://{bucket}/report", addressing_style="path")


def test_plan_compact_finish_on_s3(report):
    infos = [ObjectInfo(f"a/{i:03d}.png", i, f"e{i}", f"s3://imgs/a/{i:03d}.png") for i in range(10)]
    plan = prepare_plan(report, report, "run-s3", BATCH, "m1", "s3://m", "distributed", infos)
    commit_plan(report, plan)
    assert reports.read_listing(report) == infos
    bl = BatchListing(report)
    assert list(bl.infos(batch_id(1), [i.key for i in infos[3:6]]).values()) == infos[3:6]
    for n in range(plan.n_batches):
        rows = [
            {
                "run_id": "run-s3",
                "image_uri": i.uri,
                "size": i.size,
                "etag": i.etag,
                "model_id": "m1",
                "threshold": 1.0,
                "attempt": 0,
                "worker": "w",
                "error": "test row",
            }
            for i in infos[n * BATCH : (n + 1) * BATCH]
        ]
        reports.write_part(report, batch_id(n), rows)
    resumed = prepare_plan(report, report, "run-s3", BATCH, "m1", "s3://m", "distributed")
    out = finish_report(report, resumed, model_id="m1", threshold=1.0, top_k=3, seconds=1.0, extra={}, images_now=None)
    assert (out["rows"], out["errors"]) == (10, 10)
    manifest = compaction.read_manifest(report)
    assert manifest is not None and manifest["rows"] == 10
    assert reports.sources(report).parts == []
    assert sorted(reports.read_report(report)["image_uri"].to_pylist()) == [i.uri for i in infos]
    assert [b for b, _ in reports.iter_batches(report)] == [batch_id(n) for n in range(4)]
    assert compaction.compact(report) == manifest  # idempotent
