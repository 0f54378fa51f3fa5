"""Distributed scoring against a real S3 server (SeaweedFS), Redis and a local 2-CPU Ray on loopback.

All 83 MVTec AD bottle test images and the default-config model (tests/conftest.py `small_model`,
256x256) are uploaded to S3; `run_score` reads images and model from s3:// and writes the report to
s3://. Every image's score must equal the single-process `score_keys` score within 1e-5 (computed in
the run's batches and with the actors' thread counts: see fixtures_dist), the report must hold exactly
one row per listed image, and summary.json + _SUCCESS must exist. Then the same fit with
`patchcore.shards: 3` (same seed, so the same bank split in three) must score like the 1-shard model,
through three index-shard actors, on a seeded 24-image subset (scoring time on 2 CPUs).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures_dist import (
    assert_exactly_once,
    assert_scores_match,
    bottle_test_images,
    by_key,
    fit_small,
    knn_threads,
    link_images,
    loopback_ray,
    new_run_id,
    point_aws_at,
    redis_url,  # noqa: F401 (fixture)
    reference_scores,
    report_rows,
    run_config,
    run_ids,  # noqa: F401 (fixture)
    upload_tree,
)

pytestmark = pytest.mark.integration

BUCKET = "patchaudit-dist"
SUBSET_PER_TYPE = 6  # 4 test folders x 6 = 24 images for the 3-shard run
BATCH = 8  # images per queue message; the reference scores the same batches


@dataclasses.dataclass(frozen=True)
class S3Case:
    root: str  # s3://bucket/<unique>
    images_uri: str  # all 83 test images
    subset_uri: str  # the 24-image subset
    model_uri: str  # the 1-shard small_model
    local_images: Path  # the same images on disk (the single-process reference reads these)
    keys: tuple[str, ...]
    subset_keys: tuple[str, ...]


@pytest.fixture(scope="module")
def aws_env(s3_server) -> Iterator[Any]:
    """The AWS settings of conftest's `s3_env`, for the whole module and set before Ray starts, so the
    Ray worker processes (which inherit the environment of the raylet) reach the same S3 server."""
    with pytest.MonkeyPatch.context() as mp:
        point_aws_at(mp, s3_server)
        yield s3_server


@pytest.fixture(scope="module")
def ray_s3(aws_env) -> Iterator[Any]:
    with loopback_ray(num_cpus=2) as ray:
        yield ray


@pytest.fixture(scope="module")
def case(aws_env, small_model, bottle_dir: Path, tmp_path_factory) -> S3Case:
    from patchaudit.store.objects import open_store

    aws_env.make_bucket(BUCKET)
    root = f"s3://{BUCKET}/dist-{uuid.uuid4().hex[:8]}"
    local = tmp_path_factory.mktemp("bottle_test")
    keys = link_images(bottle_test_images(bottle_dir), bottle_dir, local)
    subset = link_images(
        bottle_test_images(bottle_dir, SUBSET_PER_TYPE, seed=1), bottle_dir, tmp_path_factory.mktemp("bottle_subset")
    )
    assert len(keys) == 83 and len(subset) == 4 * SUBSET_PER_TYPE
    images = open_store(f"{root}/images")
    assert upload_tree(local, images) == keys
    subset_store = open_store(f"{root}/subset")
    for k in subset:
        subset_store.write_file(k, local / k)
    upload_tree(small_model.path, open_store(f"{root}/model"))
    return S3Case(root, images.uri, subset_store.uri, f"{root}/model", local, tuple(keys), tuple(subset))


def test_s3_run_matches_single_process(ray_s3, case: S3Case, small_model, redis_url, run_ids) -> None:  # noqa: F811
    from patchaudit.scheduler.run import run_score
    from patchaudit.store import reports
    from patchaudit.store.objects import open_store

    run_id = new_run_id("s3")
    run_ids.append(run_id)
    report_uri = f"{case.root}/reports/{run_id}"
    config = run_config(redis_url, batch_size=BATCH, feature_workers=2, heatmaps=True)
    res = run_score(config, case.images_uri, case.model_uri, report_uri, run_id=run_id, progress=False)

    report = open_store(report_uri)
    assert report.exists("summary.json") and reports.is_complete(report)  # _SUCCESS, written last
    rows = report_rows(report_uri)
    assert_exactly_once(rows, [f"{case.images_uri}/{k}" for k in case.keys])
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]][:3]
    # Single process, from the local copies with the local model, batched and threaded like the run.
    reference = reference_scores(
        small_model.uri, str(case.local_images), case.keys, batch_size=BATCH, knn_threads=knn_threads(res)
    )
    assert_scores_match(rows, case.images_uri, reference)

    summary = json.loads(report.read_bytes("summary.json"))
    assert summary["run_id"] == run_id == res["run_id"]
    assert (summary["rows"], summary["scored"], summary["errors"]) == (83, 83, 0)
    assert summary["mode"] == "distributed" and summary["batches"] == 11  # ceil(83 / 8)
    assert sum(w["batches"] for w in summary["workers"]) == 11
    # Heatmaps of anomalous images were written next to the report, in S3.
    anomalous = [r for r in rows if r["is_anomalous"]]
    assert anomalous, "the bottle test split has defects: some images must exceed the threshold"
    for r in anomalous[:5]:
        assert r["heatmap_uri"].startswith(report.uri + "/heatmaps/")
        assert report.head(r["heatmap_uri"][len(report.uri) + 1 :]).size > 0


def test_three_shards_score_like_one(
    ray_s3, case: S3Case, small_model, bottle_dir: Path, tmp_path: Path, redis_url, run_ids
) -> None:  # noqa: F811
    from patchaudit.scheduler.run import run_score
    from patchaudit.store.artifacts import read_manifest
    from patchaudit.store.objects import open_store
    from patchaudit.workers.model import load_model

    three = tmp_path / "model3"
    fit_small(bottle_dir, three, train_keys=small_model.train_keys, image_size=(256, 256), shards=3)
    one_model, three_model = load_model(small_model.uri), load_model(str(three))
    # Same seed, same images: the same bank, cut in three contiguous shards.
    banks = [np.concatenate([s.vectors() for s in m.index.shards]) for m in (one_model, three_model)]
    assert len(three_model.index.shards) == 3
    np.testing.assert_array_equal(banks[0], banks[1])
    assert three_model.threshold == pytest.approx(one_model.threshold, abs=1e-5)
    model_uri = f"{case.root}/model3"
    upload_tree(three, open_store(model_uri))
    assert read_manifest(open_store(model_uri))["shard_count"] == 3

    run_id = new_run_id("s3shards")
    run_ids.append(run_id)
    report_uri = f"{case.root}/reports/{run_id}"
    config = run_config(redis_url, batch_size=BATCH, feature_workers=2, heatmaps=False)
    res = run_score(config, case.subset_uri, model_uri, report_uri, run_id=run_id, progress=False)

    rows = report_rows(report_uri)
    assert_exactly_once(rows, [f"{case.subset_uri}/{k}" for k in case.subset_keys])
    # The 1-shard model, single process, on the same batches.
    ref = reference_scores(
        small_model.uri, str(case.local_images), case.subset_keys, batch_size=BATCH, knn_threads=knn_threads(res)
    )
    assert_scores_match(rows, case.subset_uri, ref)
    assert set(by_key(rows, case.subset_uri)) == set(case.subset_keys)
    shards = sorted(res["shards"], key=lambda s: s["shard"])
    assert [s["shard"] for s in shards] == [0, 1, 2], shards
    assert [s["offset"] for s in shards] == [0, shards[0]["ntotal"], shards[0]["ntotal"] + shards[1]["ntotal"]]
    assert sum(s["ntotal"] for s in shards) == len(banks[0])
