"""Planning and resuming a run: one set of rules for the distributed path and `--single-process`.

Real Redis (the shared one for plain runs, a private `redis-server` where the test flushes it), real
files, a tiny PatchCore model (64x64, 10 bottle images). No Ray: every case here is decided before
the actors would start, or is driven through the queue directly, as the workers would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_dist import (
    bottle_test_images,
    fit_small,
    link_images,
    new_run_id,
    redis_url,  # noqa: F401 (fixture)
    run_config,
    run_ids,  # noqa: F401 (fixture)
)

from patchaudit.queue.streams import BatchQueue, QueueOptions, RunKeys
from patchaudit.scheduler.local import score_single
from patchaudit.scheduler.plan import RUN_KEY, RunError, commit_plan, prepare_plan
from patchaudit.scheduler.run import queue_plan, run_score
from patchaudit.scheduler.status import run_status
from patchaudit.store import reports
from patchaudit.store.objects import open_store

pytestmark = pytest.mark.integration

BATCH = 2
OPTIONS = QueueOptions(idle_ms=60_000, max_attempts=3, block_ms=0, backoff_s=0.0)


@pytest.fixture(scope="module")
def model_uri(bottle_dir: Path, tmp_path_factory) -> str:
    return fit_small(bottle_dir, tmp_path_factory.mktemp("model64"), n_train=10, image_size=(64, 64))


@pytest.fixture(scope="module")
def images(bottle_dir: Path, tmp_path_factory) -> str:
    """A folder of 6 bottle test images (3 batches of 2)."""
    root = tmp_path_factory.mktemp("images")
    link_images(bottle_test_images(bottle_dir, per_type=2)[:6], bottle_dir, root)
    return str(root)


@pytest.fixture
def private_redis() -> Iterator[Any]:
    """A client of a private redis-server on a free loopback port (FLUSHALL is ours to do)."""
    import redis

    from patchaudit.scheduler.local_redis import ensure_redis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ensure_redis(f"redis://127.0.0.1:{port}/0") as handle:
        assert handle.private
        client = redis.Redis.from_url(handle.url, socket_timeout=10)
        yield client
        client.close()


def _rows(run_id: str, keys: tuple[str, ...], src: Any) -> list[dict[str, Any]]:
    return [
        {
            "run_id": run_id,
            "image_uri": src.uri_for(k),
            "size": 1,
            "etag": "e",
            "model_id": "m",
            "threshold": 1.0,
            "attempt": 0,
            "worker": "test",
            "error": "test row",
        }
        for k in keys
    ]


def _plan(tmp_path: Path, images: str, run_id: str, mode: str = "distributed") -> tuple[Any, Any, Any]:
    report, src = open_store(str(tmp_path / "report")), open_store(images)
    plan = prepare_plan(report, src, run_id, BATCH, "m", "file:///model", mode)
    commit_plan(report, plan)
    return plan, report, src


# ---------------------------------------------------------------- resume trusts the report's parts


@pytest.mark.parametrize("late_part", [True, False], ids=["late-ack-with-part", "late-ack-without-part"])
def test_resume_after_flushall_requeues_every_batch_without_a_part(
    private_redis, tmp_path: Path, images: str, late_part: bool
) -> None:
    run_id = new_run_id("flush")
    plan, report, src = _plan(tmp_path, images, run_id)
    q = BatchQueue(private_redis, run_id, OPTIONS)
    assert queue_plan(q, plan, report).batch_ids == ["b000000", "b000001", "b000002"]
    d0, d1 = q.claim("w1", count=2)
    reports.write_part(report, d0.batch_id, _rows(run_id, d0.message.keys, src))
    q.ack(d0, "w1")
    # Redis loses the run; then a worker that held b000001 acks it (having written its part, or not).
    private_redis.flushall()
    if late_part:
        reports.write_part(report, d1.batch_id, _rows(run_id, d1.message.keys, src))
    q.ack(d1, "w1")

    resumed = BatchQueue(private_redis, run_id, OPTIONS)
    todo = queue_plan(resumed, plan, report).batch_ids
    assert todo == (["b000002"] if late_part else ["b000001", "b000002"])
    p = resumed.progress()
    assert (p.total, p.done_ok, p.dead) == (3, 3 - len(todo), 0)  # every planned batch is counted
    assert not resumed.is_finished()
    assert run_status(run_id, _url(private_redis))["batches"] == 3
    got = []
    while d := resumed.claim("w2", count=3):
        for x in d:
            reports.write_part(report, x.batch_id, _rows(run_id, x.message.keys, src))
            resumed.ack(x, "w2")
            got.append(x.batch_id)
    assert sorted(got) == todo
    assert resumed.is_finished()
    assert reports.list_parts(report) == ["b000000", "b000001", "b000002"]


def _url(client: Any) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_status_says_starting_before_the_batches_are_queued(private_redis) -> None:
    run_id = new_run_id("starting")
    q = BatchQueue(private_redis, run_id, OPTIONS)
    assert q.mark_starting(60)
    status = run_status(run_id, _url(private_redis))
    assert (status["state"], status["batches"], status["finished"]) == ("starting", 0, False)


# ---------------------------------------------------------------- one rule for both modes


def test_both_modes_refuse_a_report_holding_another_run_with_the_same_message(
    tmp_path: Path, images: str, model_uri: str, redis_url: str, run_ids: list[str]
) -> None:  # noqa: F811
    config = run_config(redis_url, batch_size=BATCH)
    # A single-process report, then a distributed run into it (and the other way round).
    sp = tmp_path / "sp"
    first = score_single(config, images, model_uri, str(sp), new_run_id("sp"))
    assert first["rows"] == 6
    run_ids.append(other := new_run_id("dist"))
    with pytest.raises(RunError) as dist_err:
        run_score(config, images, model_uri, str(sp), run_id=other, progress=False)
    with pytest.raises(RunError) as sp_err:
        score_single(config, images, model_uri, str(sp), new_run_id("sp2"))
    expected = f"report prefix {open_store(str(sp)).uri} already holds run {first['run_id']!r}"
    assert str(dist_err.value).startswith(expected)
    assert str(sp_err.value).startswith(expected)
    assert reports.read_report(open_store(str(sp))).num_rows == 6  # nothing mixed in
    assert json.loads((sp / RUN_KEY).read_text())["run_id"] == first["run_id"]

    # A distributed run's plan refuses a single-process run into it, with the same words.
    dist = tmp_path / "dist"
    _plan_dir = tmp_path / "dist-plan"
    plan, report, _ = _plan(_plan_dir, images, "held-run")
    shutil.copytree(_plan_dir / "report", dist)
    with pytest.raises(RunError, match=r"already holds run 'held-run'; pass --run-id held-run to resume it"):
        score_single(config, images, model_uri, str(dist), new_run_id("sp3"))
    assert not (dist / reports.SUCCESS_KEY).exists()
    assert reports.list_parts(open_store(str(dist))) == []


def test_report_parts_without_a_plan_are_refused_in_both_modes(
    tmp_path: Path, images: str, model_uri: str, redis_url: str, run_ids: list[str]
) -> None:  # noqa: F811
    config = run_config(redis_url, batch_size=BATCH)
    report = open_store(str(tmp_path / "report"))
    reports.write_part(report, "b000000", _rows("old", ("x.png",), report))  # e.g. an older version's report
    run_ids.append(run_id := new_run_id("parts"))
    for call in (
        lambda: run_score(config, images, model_uri, report.uri, run_id=run_id, progress=False),
        lambda: score_single(config, images, model_uri, report.uri, new_run_id("sp")),
    ):
        with pytest.raises(RunError, match="already holds report parts of another run"):
            call()
    assert not report.exists(RUN_KEY)


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_both_modes_refuse_an_input_without_images(
    tmp_path: Path,
    model_uri: str,
    redis_url: str,  # noqa: F811
    run_ids: list[str],
    kind: str,
) -> None:
    config = run_config(redis_url, batch_size=BATCH)
    src = tmp_path / "input"
    if kind == "empty":
        src.mkdir()
        (src / "notes.txt").write_text("not an image")
    run_ids.append(run_id := new_run_id("noinput"))
    messages = []
    for mode, call in (
        ("distributed", lambda r: run_score(config, str(src), model_uri, r, run_id=run_id, progress=False)),
        ("single", lambda r: score_single(config, str(src), model_uri, r, run_id)),
    ):
        report = tmp_path / f"report-{mode}"
        with pytest.raises(RunError, match="no images found under") as err:
            call(str(report))
        messages.append(str(err.value))
        assert not report.exists() or not any(report.iterdir()), f"{mode} wrote {list(report.iterdir())}"
    assert messages[0] == messages[1]
    import redis

    assert not redis.Redis.from_url(redis_url).exists(RunKeys.of(run_id).meta)  # no "starting" left


def test_a_run_that_cannot_reach_redis_leaves_the_report_prefix_free(
    tmp_path: Path, images: str, model_uri: str, redis_url: str, run_ids: list[str]
) -> None:  # noqa: F811
    from patchaudit.scheduler.local_redis import RedisUnavailable

    report = tmp_path / "report"
    dead = run_config("redis://192.0.2.1:6379/0", batch_size=BATCH)  # TEST-NET: no Redis
    with pytest.raises(RedisUnavailable):
        run_score(dead, images, model_uri, str(report), run_id=new_run_id("dead"), progress=False)
    assert not report.exists() or not any(report.iterdir())
    # The next plain run plans into it (here: single-process, so no Ray is needed to prove it).
    res = score_single(run_config(redis_url, batch_size=BATCH), images, model_uri, str(report), None)
    assert res["rows"] == 6


# ---------------------------------------------------------------- resume and re-run in one process


def test_single_process_resumes_its_run_and_a_finished_run_returns_its_summary(
    tmp_path: Path, images: str, model_uri: str, redis_url: str
) -> None:  # noqa: F811
    config = run_config(redis_url, batch_size=BATCH)
    report = tmp_path / "report"
    run_id = new_run_id("resume")
    first = score_single(config, images, model_uri, str(report), run_id)
    again = score_single(config, images, model_uri, str(report), run_id)
    assert again["already_complete"] is True
    assert again["images_per_second"] == first["images_per_second"]
    assert json.loads((report / reports.SUMMARY_KEY).read_text()) == {
        k: v for k, v in first.items() if k != "report_uri"
    }
    # A lost part (and no _SUCCESS): the same run id scores that batch only.
    (report / "parts" / "b000001.parquet").unlink()
    (report / reports.SUCCESS_KEY).unlink()
    resumed = score_single(config, images, model_uri, str(report), run_id)
    assert (resumed["rows"], resumed["images_scored_now"], resumed["resumed"]) == (6, 2, True)
    assert "already_complete" not in resumed


def test_a_model_with_an_edited_manifest_is_refused(
    tmp_path: Path, images: str, model_uri: str, redis_url: str
) -> None:  # noqa: F811
    from patchaudit.errors import ArtifactError

    edited = tmp_path / "model"
    shutil.copytree(open_store(model_uri).root, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    (edited / "manifest.json").write_text(json.dumps({**manifest, "threshold": 1000.0}))
    report = tmp_path / "report"
    with pytest.raises(ArtifactError, match="was edited after the model was written"):
        score_single(run_config(redis_url, batch_size=BATCH), images, str(edited), str(report), None)
    assert not report.exists()


def test_every_file_under_the_input_is_a_row_or_a_counted_skip(
    tmp_path: Path, images: str, model_uri: str, redis_url: str
) -> None:  # noqa: F811
    import pyarrow.compute as pc

    src = sorted(Path(images).rglob("*.png"))[:2]
    root, outside = tmp_path / "input", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(src[0], root / "plain.png")
    for raw in (b"scan\xff.png", b"a\\b.png", b"50%.png"):  # valid on the filesystem, not as literal keys
        shutil.copy(src[1], os.path.join(os.fsencode(root), raw))
    shutil.copy(src[0], outside / "secret.png")
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink(root / "gone.png", root / "dangling.png")
    (root / "notes.txt").write_text("not an image")

    res = score_single(run_config(redis_url, batch_size=BATCH), str(root), model_uri, str(tmp_path / "report"), None)
    table = reports.read_report(open_store(str(tmp_path / "report")))
    uri = open_store(str(root)).uri
    rows = dict(zip(table["image_uri"].to_pylist(), table["error"].to_pylist()))
    assert set(rows) == {f"{uri}/{k}" for k in ("plain.png", "scan%FF.png", "a%5Cb.png", "50%25.png", "escape.png")}
    assert "symlink outside the input" in rows[f"{uri}/escape.png"]
    assert [k for k, e in rows.items() if e is None] == sorted(set(rows) - {f"{uri}/escape.png"})
    assert res["skipped"] == {"broken symlink": 1, "not an image (file extension)": 1}
    assert (res["rows"], res["errors"]) == (5, 1)
    assert int(pc.sum(pc.is_valid(table["score"])).as_py()) == 4


def test_cli_config_of_run_settings_only_scores_a_model_of_any_size(
    tmp_path: Path, images: str, model_uri: str, capsys
) -> None:
    from patchaudit.scheduler.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run: {{batch_size: {BATCH}}}\n")  # no model section: the 64x64 model's geometry is used
    code = main(
        [
            "score",
            "--single-process",
            "--input",
            images,
            "--model",
            model_uri,
            "--report",
            str(tmp_path / "report"),
            "--config",
            str(cfg),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    first = json.loads(out)
    assert first["rows"] == 6 and "already_complete" not in first
    # The same run again: its summary as it was, and said so.
    assert (
        main(
            [
                "score",
                "--single-process",
                "--input",
                images,
                "--model",
                model_uri,
                "--report",
                str(tmp_path / "report"),
                "--config",
                str(cfg),
                "--run-id",
                first["run_id"],
            ]
        )
        == 0
    )
    again = json.loads(capsys.readouterr()[0])
    assert again == {**first, "already_complete": True}
