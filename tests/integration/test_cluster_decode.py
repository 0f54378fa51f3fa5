"""`run.decode: cluster` end to end (real Redis, local 2-CPU Ray on loopback, bottle images).

- Decode actors decode, the feature worker only scores: the report equals a `run.decode: worker` run's
  (scores within 1e-5, the same error rows for the same bad files), and no worker ever had more
  decode requests out than `run.decode_in_flight`.
- A decode actor SIGKILLed with requests at it (SIGSTOPped first, so they cannot finish): the run
  finishes with every image exactly once, the same scores, and the lost requests redone (on the
  restarted actor, or in the worker).

Model: PatchCore at 128x128 on 24 bottle train images; input: 8 bottle test images and 2 bad files.
Both modes run the backbone on one thread (worker mode: 2 workers on 2 CPUs; cluster mode: 1 worker and
1 decode actor), so their float sums run in the same order.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fixtures_dist import (
    SCORE_ATOL,
    actor_pids,
    assert_exactly_once,
    bottle_test_images,
    by_key,
    check_running,
    link_images,
    new_run_id,
    redis_url,  # noqa: F401 (fixture)
    report_rows,
    run_config,
    run_ids,  # noqa: F401 (fixture)
    wait_until,
)

pytestmark = pytest.mark.integration

BATCH = 2
BAD = {"bad/empty.png": b"", "bad/text.png": b"this is not an image\n"}


@pytest.fixture(scope="module")
def images(bottle_dir: Path, tmp_path_factory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("images")
    keys = link_images(bottle_test_images(bottle_dir, per_type=2), bottle_dir, root)
    for key, data in BAD.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return f"file://{root}", sorted(keys + list(BAD))


@pytest.fixture(scope="module")
def worker_mode(ray_local, model_uri, images, redis_url, tmp_path_factory) -> dict[str, dict[str, Any]]:  # noqa: F811
    """The report of a `run.decode: worker` run, by key."""
    from patchaudit.scheduler.run import run_score

    report = tmp_path_factory.mktemp("worker") / "report"
    run_id = new_run_id("decode-worker")
    try:
        config = run_config(redis_url, batch_size=BATCH, feature_workers=2, heatmaps=False, decode="worker")
        run_score(config, images[0], model_uri, str(report), run_id=run_id, progress=False)
    finally:
        _forget(redis_url, run_id)
    return by_key(report_rows(str(report)), images[0])


def _forget(redis_url: str, run_id: str) -> None:  # noqa: F811
    import redis

    from patchaudit.queue.streams import BatchQueue

    client = redis.Redis.from_url(redis_url)
    BatchQueue(client, run_id).delete()
    client.close()


def _claimed(redis_url: str, run_id: str) -> bool:  # noqa: F811
    """A batch of the run was claimed (the stream's consumer group has a consumer)."""
    import redis

    from patchaudit.queue.streams import GROUP, RunKeys

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return bool(client.xinfo_consumers(RunKeys.of(run_id).stream, GROUP))
    except redis.ResponseError:  # no stream or group yet
        return False
    finally:
        client.close()


def _assert_like_worker_mode(rows: list[dict[str, Any]], images: tuple[str, list[str]], want: dict) -> None:
    assert_exactly_once(rows, [f"{images[0]}/{k}" for k in images[1]])
    got = by_key(rows, images[0])
    assert {k: r["error"] for k, r in got.items()} == {k: r["error"] for k, r in want.items()}
    assert {k for k, r in got.items() if r["error"]} == set(BAD)  # the bad files, and only they
    for key, row in want.items():
        if row["score"] is None:
            assert got[key]["score"] is None
            continue
        assert abs(got[key]["score"] - row["score"]) <= SCORE_ATOL, (key, got[key]["score"], row["score"])
        assert got[key]["is_anomalous"] == row["is_anomalous"]


def test_cluster_decode_scores_like_worker_decode(
    ray_local,
    model_uri,
    images,
    worker_mode,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
) -> None:
    from patchaudit.scheduler.run import run_score

    run_id = new_run_id("decode-cluster")
    run_ids.append(run_id)
    config = run_config(
        redis_url,
        batch_size=BATCH,
        feature_workers=1,
        heatmaps=False,
        decode="cluster",
        decode_actors=1,
        decode_in_flight=2,
    )
    res = run_score(config, images[0], model_uri, str(tmp_path / "report"), run_id=run_id, progress=False)
    _assert_like_worker_mode(report_rows(str(tmp_path / "report")), images, worker_mode)
    [worker] = res["workers"]
    decode = worker["decode"]
    assert decode["requests"] == len(images[1]) // BATCH  # one request per batch (a batch is one device batch)
    assert 1 <= decode["peak_in_flight"] <= 2
    assert decode["retries"] == 0 and decode["local_decodes"] == 0
    assert decode["nodes"] == [worker["node"]]  # one node here


def test_a_killed_decode_actor_loses_and_duplicates_nothing(
    ray_local,
    model_uri,
    images,
    worker_mode,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
) -> None:
    from patchaudit.scheduler.run import run_score

    run_id = new_run_id("decode-kill")
    run_ids.append(run_id)
    config = run_config(
        redis_url, batch_size=BATCH, feature_workers=1, heatmaps=False, decode="cluster", decode_actors=1
    )
    report = tmp_path / "report"
    stopped: list[int] = []

    class StopTheDecoder(logging.Handler):
        """SIGSTOPs the decode actor where the scheduler logs that its decode actors are up: after they
        answered, before any feature worker runs, so every decode request waits at the stopped actor and
        is lost with it, however fast the machine decodes."""

        def emit(self, record: logging.LogRecord) -> None:
            if stopped or "decode actor(s) of" not in record.getMessage():
                return
            pid = actor_pids(f"decode-{run_id}-0")[f"decode-{run_id}-0"]  # no call to the actor
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    run_log = logging.getLogger("patchaudit.scheduler.run")
    handler, level = StopTheDecoder(), run_log.level
    run_log.addHandler(handler)
    run_log.setLevel(logging.INFO)
    pool = ThreadPoolExecutor(1, thread_name_prefix="run_score")
    try:
        fut = pool.submit(run_score, config, images[0], model_uri, str(report), run_id=run_id, progress=False)
        try:
            wait_until(lambda: check_running(fut) or stopped, 240, "the decode actor to be up and stopped")
            wait_until(lambda: check_running(fut) or _claimed(redis_url, run_id), 120, "a batch to be claimed")
            time.sleep(0.5)  # the worker's decode request follows its claim within milliseconds
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGKILL)  # with requests at it: they are redone
        res = fut.result(timeout=300)
    finally:
        run_log.removeHandler(handler)
        run_log.setLevel(level)
        pool.shutdown(wait=False, cancel_futures=True)
    _assert_like_worker_mode(report_rows(str(report)), images, worker_mode)
    [worker] = res["workers"]
    assert worker["decode"]["retries"] + worker["decode"]["local_decodes"] >= 1, worker["decode"]
    assert res["errors"] == len(BAD)
