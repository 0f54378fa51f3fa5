"""Faults in a distributed run (real Redis, local 2-CPU Ray on loopback, file:// stores).

Each test breaks one thing and checks that the run still completes with every listed image in exactly
one report row:
- a feature worker is killed while it holds a batch: another worker reclaims the batch after
  `reclaim_idle_s` and scores it (attempt 1);
- an index-shard actor is killed: Ray restarts it, the search calls are retried, nothing is lost;
- the scheduler (the `patchaudit score` process) is SIGKILLed; re-running with the same --run-id
  finishes the report without rescoring batches whose parts already existed;
- a poison batch fails on every attempt: it is dead-lettered with its reason, its images become error
  rows, the rest is scored;
- a folder of broken files: error rows with reasons for the undecodable ones, scores for the 16-bit
  PNG and the CMYK JPEG.

Model: PatchCore at 128x128 on 24 bottle train images; input: 24 bottle test images in 12 batches.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures_dist import (
    REPO_ROOT,
    actor_pids,
    alive,
    assert_exactly_once,
    assert_scores_match,
    bottle_test_images,
    by_key,
    check_running,
    cli_score,
    knn_threads,
    link_images,
    new_run_id,
    pid_of,
    redis_url,  # noqa: F401 (fixture)
    reference_scores,
    report_rows,
    run_config,
    run_ids,  # noqa: F401 (fixture)
    wait_until,
)

from patchaudit.queue.streams import GROUP  # the consumer group of a run's stream

pytestmark = pytest.mark.integration

BATCH = 2
RUN_TIMEOUT_S = 300


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images(bottle_dir: Path, tmp_path_factory) -> tuple[str, list[str]]:
    """(input URI, sorted keys) of 24 bottle test images, 6 from each test folder."""
    root = tmp_path_factory.mktemp("images")
    keys = link_images(bottle_test_images(bottle_dir, per_type=6), bottle_dir, root)
    return f"file://{root}", keys


@pytest.fixture(scope="module")
def reference(model_uri: str, images: tuple[str, list[str]]) -> Callable[[dict], dict[str, float | None]]:
    """Single-process scores of `images` computed like a finished run (its summary): by key."""
    cache: dict[int, dict[str, float | None]] = {}

    def scores(summary: dict[str, Any]) -> dict[str, float | None]:
        threads = knn_threads(summary)
        if threads not in cache:
            cache[threads] = reference_scores(model_uri, images[0], images[1], batch_size=BATCH, knn_threads=threads)
        return cache[threads]

    return scores


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:  # noqa: F811
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


# ---------------------------------------------------------------- helpers


def _stream(run_id: str) -> str:
    from patchaudit.queue.streams import RunKeys

    return RunKeys.of(run_id).stream


def _pending(client: Any, run_id: str, consumer: str | None = None) -> list[dict[str, Any]]:
    """Entries delivered and not yet acked (optionally of one consumer); [] before the group exists."""
    import redis

    try:
        return client.xpending_range(
            _stream(run_id), GROUP, min="-", max="+", count=1000, **({"consumername": consumer} if consumer else {})
        )
    except redis.ResponseError:  # NOGROUP: nothing enqueued yet
        return []


def _batch_of(client: Any, run_id: str, entry_id: str) -> str:
    from patchaudit.queue.messages import BatchMessage

    [(_, fields)] = client.xrange(_stream(run_id), min=entry_id, max=entry_id)
    return BatchMessage.decode(fields["msg"]).batch_id


def _freeze_workers(run_id: str) -> list[int]:
    """SIGSTOP every feature-worker process of the run that exists (started or starting); their pids.

    With its workers stopped no batch of the run can finish, so a fault injected next lands in a run that
    is certainly unfinished, however fast the machine scores (a bottle image takes tens of milliseconds).
    A worker still waiting for a CPU has no process yet; it stays as slow to start as it already was.
    """
    pids = list(actor_pids(f"worker-{run_id}-").values())
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def _thaw(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def _background_run(config: Any, input_uri: str, model_uri: str, report: Path, run_id: str) -> Iterator[Any]:
    """run_score in a thread (the test injects faults meanwhile); yields its future.

    Leaving the block never waits for the thread: a failed test must not hang on a stuck run (the
    module's Ray shutdown ends it).
    """
    from patchaudit.scheduler.run import run_score

    pool = ThreadPoolExecutor(1, thread_name_prefix="run_score")
    try:
        yield pool.submit(run_score, config, input_uri, model_uri, str(report), run_id=run_id, progress=False)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _assert_clean_run(report: Path, images: tuple[str, list[str]], reference: dict[str, float | None]) -> list[dict]:
    """Every image once, all scored, scores as in a single process."""
    rows = report_rows(str(report))
    assert_exactly_once(rows, [f"{images[0]}/{k}" for k in images[1]])
    assert [r["error"] for r in rows if r["error"]] == []
    assert_scores_match(rows, images[0], reference)
    assert (report / "_SUCCESS").exists()
    return rows


# ---------------------------------------------------------------- tests


def test_killed_feature_worker_batch_is_reclaimed(
    ray_local,
    model_uri,
    images,
    reference,
    redis_url,  # noqa: F811
    redis_client,
    run_ids,
    tmp_path: Path,
) -> None:  # noqa: F811
    ray = ray_local
    run_id = new_run_id("killworker")
    run_ids.append(run_id)
    config = run_config(redis_url, batch_size=BATCH, feature_workers=2, heatmaps=False, reclaim_idle_s=3.0)

    def freeze_a_holder() -> tuple[str, int, list[str]] | None:
        """SIGSTOP a worker that holds a batch, so that batch is certain to be in flight when it dies."""
        check_running(fut)
        for entry in _pending(redis_client, run_id):
            consumer = entry["consumer"]
            pid = pid_of(consumer)
            os.kill(pid, signal.SIGSTOP)
            held = [e["message_id"] for e in _pending(redis_client, run_id, consumer)]
            if held:
                return consumer, pid, held
            os.kill(pid, signal.SIGCONT)  # it acked in between: let it go on, try again
        return None

    with _background_run(config, images[0], model_uri, tmp_path / "report", run_id) as fut:
        consumer, pid, held = wait_until(freeze_a_holder, 180, "a feature worker holding a batch")
        try:
            stranded = {_batch_of(redis_client, run_id, e) for e in held}
            victim = ray.get_actor(f"worker-{run_id}-{consumer.split('@')[0][2:]}")  # fw<N> -> worker-<run>-<N>
            ray.kill(victim, no_restart=True)
            wait_until(lambda: not alive(pid), 30, f"killed worker {consumer} to exit")
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
        res = fut.result(timeout=RUN_TIMEOUT_S)

    rows = _assert_clean_run(tmp_path / "report", images, reference(res))
    # The stranded batch was reclaimed by a live worker: its rows come from a later attempt.
    batch_rows = [r for r in rows if r["image_uri"] in _uris_of_batches(images, stranded)]
    assert batch_rows and all(r["attempt"] >= 1 and r["worker"] != consumer for r in batch_rows), batch_rows
    assert consumer not in {w["worker"] for w in res["workers"]}  # it never returned its counters


def _uris_of_batches(images: tuple[str, list[str]], batch_ids: set[str]) -> set[str]:
    input_uri, keys = images
    return {f"{input_uri}/{k}" for n in (int(b[1:]) for b in batch_ids) for k in keys[n * BATCH : (n + 1) * BATCH]}


def test_killed_index_shard_is_restarted(
    ray_local,
    model_uri,
    images,
    reference,
    redis_url,  # noqa: F811
    redis_client,
    run_ids,
    tmp_path: Path,
) -> None:
    ray = ray_local
    run_id = new_run_id("killshard")
    run_ids.append(run_id)
    # No worker dies here: a long reclaim timeout keeps waits on the restarting shard from counting as tries.
    config = run_config(redis_url, batch_size=BATCH, feature_workers=2, heatmaps=False, reclaim_idle_s=120.0)
    meta = f"patchaudit:{run_id}:meta"
    frozen: list[int] = []

    def scored_one_then_frozen() -> bool:
        check_running(fut)
        if int(redis_client.hget(meta, "done_ok") or 0) >= 1:
            frozen[:] = _freeze_workers(run_id)
        return bool(frozen)

    with _background_run(config, images[0], model_uri, tmp_path / "report", run_id) as fut:
        # The workers are stopped while the shard dies and restarts: their next searches reach the new one.
        wait_until(scored_one_then_frozen, 180, "the first scored batch", every_s=0.01)
        try:
            done_at_kill = int(redis_client.hget(meta, "done_ok") or 0)
            shard = ray.get_actor(f"shard-{run_id}-0")
            before = ray.get(shard.info.remote(), timeout=30)
            ray.kill(shard, no_restart=False)  # Ray restarts it (max_restarts=3)
            # ray.kill is asynchronous: a call made right after it can still reach the old process.
            wait_until(lambda: not alive(before["pid"]), 60, "the killed shard process to exit")
        finally:
            _thaw(frozen)
        after = ray.get(shard.info.remote(), timeout=120)
        res = fut.result(timeout=RUN_TIMEOUT_S)

    assert done_at_kill < len(images[1]) // BATCH, "the run ended before the kill"
    assert after["pid"] != before["pid"] and after["ntotal"] == before["ntotal"]
    _assert_clean_run(tmp_path / "report", images, reference(res))  # the restarted shard serves the same bank
    assert res["errors"] == 0


@pytest.mark.parametrize("redis_state", ["kept", "lost"])
def test_killed_scheduler_resumes_without_rescoring(
    ray_local,
    model_uri,
    images,
    reference,
    redis_url,  # noqa: F811
    redis_client,
    run_ids,
    tmp_path: Path,
    redis_state: str,
) -> None:
    """SIGKILL `patchaudit score` after 2 parts exist, then run it again with the same --run-id.

    "lost": the run's Redis keys are deleted before the re-run, as when the scheduler's private Redis
    (the embedded default) died with it; then the parts in the report alone say what is finished.
    """

    ray = ray_local
    run_id = new_run_id("killsched")
    run_ids.append(run_id)
    n_batches = len(images[1]) // BATCH
    cmd, env, report = cli_score(
        tmp_path,
        images[0],
        model_uri,
        run_id,
        {"batch_size": BATCH, "feature_workers": 2, "heatmaps": False, "reclaim_idle_s": 3, "redis_url": redis_url},
        ray,
    )

    def parts() -> dict[str, Path]:
        return {p.stem: p for p in (report / "parts").glob("*.parquet")}

    log1 = tmp_path / "first.log"
    frozen: list[int] = []
    with open(log1, "wb") as out:
        first = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        def two_parts_then_frozen() -> bool:
            if first.poll() is not None:
                pytest.fail(
                    f"the first run exited ({first.returncode}) before it was killed:\n{log1.read_text()[-3000:]}"
                )
            if len(parts()) >= 2:
                frozen[:] = _freeze_workers(run_id)
            return bool(frozen)

        # Its workers are stopped first: between the kill and the moment Ray ends them they could
        # otherwise finish the run on a fast machine, leaving nothing to resume.
        wait_until(two_parts_then_frozen, 180, "the first run to write 2 parts", every_s=0.01)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # The driver is gone; Ray destroys its actors, SIGSTOPped or not. Wait until no old worker can write a
    # part any more. A worker that shuts down releases its claims and leaves the consumer group, so the
    # group may already be empty: the parts name the workers that wrote them too.
    old_workers = {c["name"] for c in redis_client.xinfo_consumers(_stream(run_id), GROUP)}
    old_workers |= {w for p in parts().values() for w in _workers_in(p)}
    assert old_workers, "the first run's workers never claimed a batch"
    try:
        for pid in frozen:
            wait_until(lambda pid=pid: not alive(pid), 60, f"worker process {pid} of the killed run to exit")
    finally:
        _thaw(frozen)
    for name in old_workers:
        wait_until(lambda name=name: not alive(pid_of(name)), 60, f"{name} of the killed run to exit")
    before = {b: (p.stat().st_mtime_ns, _workers_in(p)) for b, p in parts().items()}
    assert 2 <= len(before) < n_batches, f"{len(before)} of {n_batches} parts existed at the kill"
    if redis_state == "lost":
        from patchaudit.queue.streams import RunKeys

        assert redis_client.delete(*RunKeys.of(run_id).all()) > 0

    second = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]

    summary = json.loads((report / "summary.json").read_text())
    rows = _assert_clean_run(report, images, reference(summary))
    after = parts()
    assert sorted(after) == [f"b{n:06d}" for n in range(n_batches)]
    rescored = sorted(b for b, v in before.items() if (after[b].stat().st_mtime_ns, _workers_in(after[b])) != v)
    assert not rescored, f"parts that existed before the restart were written again: {rescored}"
    assert summary["resumed"] is True and summary["rows"] == len(rows)
    new_workers = {w["worker"] for w in summary["workers"]}
    assert new_workers and not new_workers & old_workers
    assert sum(w["batches"] for w in summary["workers"]) <= n_batches - len(before)


def _workers_in(part: Path) -> tuple[str, ...]:
    import pyarrow.parquet as pq

    return tuple(sorted(set(pq.read_table(part, columns=["worker"])["worker"].to_pylist())))


def test_poison_batch_is_dead_lettered(
    ray_local,
    model_uri,
    images,
    reference,
    redis_url,  # noqa: F811
    redis_client,
    run_ids,
    tmp_path: Path,
) -> None:
    """A realistic poison: a message for planned batch b000001 that also names an object outside the
    run's listing snapshot (a stale or foreign producer). Workers refuse such a message on every try,
    so it fails until max_attempts and is dead-lettered; its two listed images become error rows.

    It is queued before the run starts; run_score then sees b000001 as already queued and leaves it.
    """
    import redis

    from patchaudit.queue.messages import BatchMessage
    from patchaudit.queue.streams import BatchQueue, QueueOptions

    run_id = new_run_id("poison")
    run_ids.append(run_id)
    input_uri, keys = images
    poisoned = keys[BATCH : 2 * BATCH]  # the plan's b000001
    queue = BatchQueue(redis.Redis.from_url(redis_url), run_id, QueueOptions(max_attempts=2))
    assert queue.enqueue([BatchMessage(run_id, "b000001", (*poisoned, "not/in/the/listing.png"))]) == 1
    config = run_config(
        redis_url, batch_size=BATCH, feature_workers=2, heatmaps=False, max_attempts=2, reclaim_idle_s=60.0
    )
    with _background_run(config, input_uri, model_uri, tmp_path / "report", run_id) as fut:
        res = fut.result(RUN_TIMEOUT_S)

    [letter] = queue.dead_letters()
    assert (letter.batch_id, letter.attempts) == ("b000001", 2)
    assert "not in the run's listing snapshot" in letter.reason and "not/in/the/listing.png" in letter.reason
    rows = report_rows(str(tmp_path / "report"))
    assert_exactly_once(rows, [f"{input_uri}/{k}" for k in keys])
    rows_by_key = by_key(rows, input_uri)
    for k in poisoned:
        r = rows_by_key[k]
        assert r["score"] is None and r["worker"] == "scheduler" and r["attempt"] == 2
        assert r["error"].startswith("dead-lettered after 2 attempt(s): LookupError: batch names 1 key(s)")
    healthy = {k: s for k, s in reference(res).items() if k not in poisoned}
    assert_scores_match([rows_by_key[k] for k in healthy], input_uri, healthy)
    assert (res["errors"], res["scored"]) == (BATCH, len(keys) - BATCH)


def _bad_files(folder: Path, bottle_dir: Path) -> dict[str, str | None]:
    """Write the broken/odd files and 3 good images; returns file name -> expected error prefix (None: scored)."""
    from PIL import Image

    folder.mkdir(parents=True)
    src = Image.open(bottle_dir / "test" / "good" / "000.png").convert("RGB").resize((300, 300))

    def encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    png = bytearray(encoded(src, "PNG"))
    png[len(png) // 2 : len(png) // 2 + 64] = bytes(range(64))  # garbage in the middle of the pixel data
    jpeg = encoded(src, "JPEG", quality=90)
    gray16 = np.asarray(src.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    files = {
        "corrupt.png": (bytes(png), "corrupt or truncated image"),
        "truncated.jpg": (jpeg[: len(jpeg) * 2 // 5], "corrupt or truncated image: image file is truncated"),
        "empty.png": (b"", "empty file (0 bytes)"),
        "notes.png": (b"this is a text file, not a PNG\n", "not an image (unrecognised format)"),
        "gray16.png": (encoded(Image.fromarray(gray16), "PNG"), None),
        "cmyk.jpg": (encoded(src.convert("CMYK"), "JPEG", quality=90), None),
    }
    assert Image.open(io.BytesIO(files["gray16.png"][0])).mode == "I;16"
    assert Image.open(io.BytesIO(files["cmyk.jpg"][0])).mode == "CMYK"
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    for name in ("000.png", "001.png", "002.png"):
        (folder / f"good_{name}").write_bytes((bottle_dir / "test" / "good" / name).read_bytes())
        files[f"good_{name}"] = (b"", None)
    return {name: reason for name, (_, reason) in files.items()}


def test_bad_files_become_error_rows(
    ray_local,
    model_uri,
    bottle_dir: Path,
    redis_url,
    run_ids,  # noqa: F811
    tmp_path: Path,
) -> None:
    folder = tmp_path / "bad"
    expected = _bad_files(folder, bottle_dir)
    input_uri = f"file://{folder}"
    keys = sorted(expected)
    run_id = new_run_id("badfiles")
    run_ids.append(run_id)
    config = run_config(redis_url, batch_size=BATCH, feature_workers=2, heatmaps=True)
    with _background_run(config, input_uri, model_uri, tmp_path / "report", run_id) as fut:
        res = fut.result(RUN_TIMEOUT_S)

    rows = report_rows(str(tmp_path / "report"))
    assert_exactly_once(rows, [f"{input_uri}/{k}" for k in keys])
    for key, row in by_key(rows, input_uri).items():
        if expected[key] is None:
            assert row["error"] is None and row["score"] is not None, (key, row["error"])
        else:
            assert row["score"] is None and row["error"].startswith(expected[key]), (key, row["error"])
            assert row["worker"] != "scheduler"  # a per-image error row from the worker, not a dead letter
    reference = reference_scores(model_uri, input_uri, keys, batch_size=BATCH, knn_threads=knn_threads(res))
    assert {k for k, s in reference.items() if s is None} == {k for k, e in expected.items() if e}
    assert_scores_match(rows, input_uri, reference)
    assert (res["errors"], res["scored"]) == (4, len(keys) - 4)
