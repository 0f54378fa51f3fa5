"""Liveness and shutdown of a distributed run (real Redis, local 2-CPU Ray on loopback, file:// stores).

- SIGINT/SIGTERM of `patchaudit score`: exit 130/143, the batches in flight are given back, the run is
  marked in Redis (and expires), and the resume claims every batch fresh (attempt 0: nothing waited
  for the reclaim timeout).
- Batches slower than `reclaim_idle_s` are not reclaimed while their worker's heartbeat runs.
- A batch over `batch_timeout_s` is failed, retried, and dead-lettered with that reason.
- A run whose feature workers find no free CPU fails after `start_timeout_s`, saying what is missing.
- A tampered model is refused by the scheduler, with the checksum error, before any actor starts; an
  actor's own error is what a run reports.

Model: PatchCore at 128x128 on 24 bottle train images; input: 24 bottle test images in 12 batches;
8 of them enlarged to 6000x6000 for the tests that need batches slower than a limit or a run still
busy when it is interrupted.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from fixtures_dist import (
    REPO_ROOT,
    assert_exactly_once,
    bottle_test_images,
    cli_score,
    link_images,
    new_run_id,
    place,
    redis_url,  # noqa: F401 (fixture)
    report_rows,
    run_actors,
    run_config,
    run_ids,  # noqa: F401 (fixture)
    wait_until,
)

pytestmark = pytest.mark.integration

BATCH = 2
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def images(bottle_dir: Path, tmp_path_factory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("images")
    keys = link_images(bottle_test_images(bottle_dir, per_type=6), bottle_dir, root)
    return f"file://{root}", keys


@pytest.fixture(scope="module")
def large_images(images: tuple[str, list[str]], tmp_path_factory) -> tuple[str, list[str]]:
    """8 of the bottle images enlarged to 6000x6000, for the tests that need batches slower than a limit.

    Decoding and resizing one takes well over 0.1 s on any CPU (0.08 s to decode 4500x4500 on 2 AMD EPYC
    cores, 2026-12-03), whereas a machine fast enough scores a bottle image at its own size in tens of
    milliseconds: timing tests that rely on the originals being slow fail there."""
    from PIL import Image

    root = tmp_path_factory.mktemp("large_images")
    keys = images[1][:8]
    for k in keys:
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(images[0].removeprefix("file://") + "/" + k) as im:
            # NEAREST keeps the file small (1-2 MB) while its decoded size is 108 MB.
            im.convert("RGB").resize((6000, 6000), Image.NEAREST).save(root / k, compress_level=1)
    return f"file://{root}", keys


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _uris(images: tuple[str, list[str]], n: int | None = None) -> list[str]:
    return [f"{images[0]}/{k}" for k in images[1][:n]]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_gives_back_its_batches_and_resumes_at_once(
    ray_local,
    model_uri,
    large_images,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
    sig,
    code,
) -> None:  # noqa: F811
    import redis

    from patchaudit.queue.streams import GROUP, RunKeys

    ray = ray_local
    # Two copies of the enlarged images, one per batch (16 batches of about a second here): a bottle image
    # at its own size takes tens of milliseconds, and a fast machine could end such a run while the signal
    # is being handled, leaving nothing to resume.
    src, root = Path(large_images[0].removeprefix("file://")), tmp_path / "input"
    for j in range(2):
        for key in large_images[1]:
            place(src / key, root / f"copy{j}" / key)
    images = (f"file://{root}", sorted(f"copy{j}/{key}" for j in range(2) for key in large_images[1]))
    run_id = new_run_id("interrupt")
    run_ids.append(run_id)
    # A reclaim timeout longer than the test may take: the resume must not depend on it. A start timeout
    # shorter than the test's own: a resume whose workers find no free CPU says so instead of timing out.
    run = {"batch_size": 1, "feature_workers": 2, "heatmaps": False, "reclaim_idle_s": 600, "start_timeout_s": 120}
    cmd, env, report = cli_score(tmp_path, images[0], model_uri, run_id, {**run, "redis_url": redis_url}, ray)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = RunKeys.of(run_id)

    def in_flight() -> int:
        try:
            return int(client.xpending(keys.stream, GROUP)["pending"])
        except redis.ResponseError:
            return 0

    log1 = tmp_path / "first.log"
    with open(log1, "wb") as out:
        # SIGINT at its default: a shell that starts the tests in the background without job control
        # hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        first = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_default_sigint
        )
    try:

        def working() -> bool:
            if first.poll() is not None:
                pytest.fail(f"the first run exited ({first.returncode}) early:\n{log1.read_text()[-3000:]}")
            return any((report / "parts").glob("*.parquet")) and in_flight() > 0

        wait_until(working, 180, "a part written and a batch in flight", every_s=0.02)
        first.send_signal(sig)
        assert first.wait(timeout=120) == code, log1.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert "Traceback" not in log1.read_text(), log1.read_text()[-3000:]
    assert in_flight() == 0, "the interrupted run left batches claimed"
    meta = client.hgetall(keys.meta)
    assert meta.get("error") == "interrupted" and 0 < client.ttl(keys.meta) <= 7 * 24 * 3600
    done_before = {p.stem for p in (report / "parts").glob("*.parquet")}

    second = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    rows = report_rows(str(report))
    assert_exactly_once(rows, _uris(images))
    assert [r["error"] for r in rows if r["error"]] == []
    # Nothing was reclaimed after an idle timeout: every batch of the resume was a first try.
    assert {r["attempt"] for r in rows} == {0}, sorted({(r["attempt"], r["worker"]) for r in rows})
    assert "error" not in client.hgetall(keys.meta)
    assert len(done_before) < len(images[1])


def test_slow_batches_are_not_reclaimed_while_their_worker_lives(
    ray_local,
    model_uri,
    large_images,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
) -> None:  # noqa: F811
    """reclaim_idle_s far below the time a batch takes: the heartbeat keeps every batch with its worker.

    8 enlarged images in batches of 4, two workers: a batch takes seconds here and well over the 0.3 s
    idle timeout on any machine; the heartbeat beats every 0.06 s."""
    from patchaudit.scheduler.run import run_score

    run_id = new_run_id("slow")
    run_ids.append(run_id)
    config = run_config(redis_url, batch_size=4, feature_workers=2, heatmaps=False, reclaim_idle_s=0.3)
    res = run_score(config, large_images[0], model_uri, str(tmp_path / "report"), run_id=run_id, progress=False)
    rows = report_rows(str(tmp_path / "report"))
    assert_exactly_once(rows, _uris(large_images))
    assert [r["error"] for r in rows if r["error"]] == []
    assert {r["attempt"] for r in rows} == {0}
    assert sum(w["batches"] for w in res["workers"]) == 2
    slowest = max(w["seconds"] / max(1, w["batches"]) for w in res["workers"])
    assert slowest > 0.3, "the batches were not slower than the idle timeout: the test proves nothing"


def test_a_batch_over_its_time_limit_is_failed_and_retried(
    ray_local,
    model_uri,
    large_images,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
) -> None:  # noqa: F811
    """Every batch takes longer than batch_timeout_s: each is failed, retried once, then dead-lettered.

    8 enlarged images in 2 batches: a batch of 4 cannot finish inside its 0.02 s limit on any machine."""
    from patchaudit.scheduler.run import run_score

    run_id = new_run_id("timeout")
    run_ids.append(run_id)
    config = run_config(
        redis_url, batch_size=4, feature_workers=1, heatmaps=False, max_attempts=2, batch_timeout_s=0.02
    )
    root, keys = large_images
    res = run_score(config, root, model_uri, str(tmp_path / "report"), run_id=run_id, progress=False)
    rows = report_rows(str(tmp_path / "report"))
    assert_exactly_once(rows, [f"{root}/{k}" for k in keys])
    assert all(r["error"] and "batch_timeout_s=0.02" in r["error"] and "after 2 attempt" in r["error"] for r in rows), [
        r["error"] for r in rows
    ]
    assert sum(w.get("timed_out_batches", 0) for w in res["workers"]) == 4  # 2 batches x 2 tries


def test_tampered_model_is_refused_before_any_actor_starts(
    ray_local,
    model_uri,
    images,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
) -> None:  # noqa: F811
    import shutil

    from patchaudit.errors import ArtifactError
    from patchaudit.scheduler.run import run_score

    run_id = new_run_id("tampered")
    run_ids.append(run_id)
    bad = tmp_path / "model"
    shutil.copytree(model_uri.removeprefix("file://"), bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    victim = bad / sorted(n for n in manifest["files"] if n != "manifest.json")[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    config = run_config(redis_url, batch_size=BATCH, feature_workers=1, heatmaps=False)
    with pytest.raises(ArtifactError, match="checksum"):
        run_score(config, images[0], f"file://{bad}", str(tmp_path / "report"), run_id=run_id, progress=False)
    # Refused by the scheduler itself: no actor of the run was ever started.
    assert not run_actors(ray_local, run_id)


def test_an_actors_first_error_is_the_runs_error(ray_local) -> None:
    """actor_error() finds the cause inside Ray's wrapping (what a run reports when its workers fail)."""
    ray = ray_local
    from patchaudit.errors import ArtifactError
    from patchaudit.scheduler.run import actor_error

    @ray.remote
    class Broken:
        def __init__(self) -> None:
            raise ArtifactError("model file file:///m/shard0.faiss does not match its manifest checksum")

        def run(self) -> int:
            return 1

    with pytest.raises(ray.exceptions.RayError) as info:
        ray.get(Broken.remote().run.remote(), timeout=120)
    assert actor_error(info.value) == (
        "ArtifactError: model file file:///m/shard0.faiss does not match its manifest checksum"
    )


def test_a_run_whose_workers_cannot_start_fails_saying_why(
    ray_local,
    model_uri,
    images,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
) -> None:  # noqa: F811
    """Another actor holds the cluster's 2 CPUs: the run fails after run.start_timeout_s, naming the
    CPUs its worker asks for and the 0 free, and leaves no actor of its own behind."""
    import redis

    from patchaudit.queue.streams import RunKeys
    from patchaudit.scheduler.run import RunError, run_score

    ray = ray_local

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self) -> bool:
            return True

    hog = Hog.remote()
    ray.get(hog.ping.remote(), timeout=120)
    try:
        run_id = new_run_id("nocpu")
        run_ids.append(run_id)
        config = run_config(redis_url, batch_size=BATCH, feature_workers=1, heatmaps=False, start_timeout_s=3)
        with pytest.raises(RunError, match=r"no feature worker of run .* could start within 3s") as err:
            run_score(config, images[0], model_uri, str(tmp_path / "report"), run_id=run_id, progress=False)
        assert "each asks for CPU 1; the Ray cluster has free CPU 0 of 2" in str(err.value)
        wait_until(
            lambda: not run_actors(ray, run_id),
            30,
            "the failed run's actors to be gone",
        )
        meta = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(RunKeys.of(run_id).meta)
        assert "could start within" in meta.get("error", "")
    finally:
        ray.kill(hog)
