"""Helpers and fixtures shared by the distributed-path integration tests (Ray, Redis, stores).

Imported by test_distributed_s3.py, test_multinode.py and test_faults.py (`from fixtures_dist import ...`;
pytest puts this folder on sys.path). Every Ray here binds 127.0.0.1 only: the environment switch
below must be set before ray is first imported, and each fixture checks the node address too.

Scores are compared with a single-process reference (`patchaudit.workers.pipeline.score_keys`, the path of
`patchaudit.scheduler.local.evaluate`) run the way the actors ran it: the run's batches, the backbone on one
thread (a feature worker's share of 2 CPUs with 2 workers, `WorkerSpec.torch_threads`) and the k-NN
on as many threads as the index shards reported in the run summary. Then the scores agree to the bit.
With another batch size or thread count float32 sums run in another order and scores move by ~1e-6
relative (measured: up to 6e-5 on bottle scores of ~20 for batches of 16 vs 8, 2e-5 for faiss on 1 vs
2 threads), which is more than the 1e-5 the tests allow.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a local Ray binds loopback only (read at import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
LOOPBACK = "127.0.0.1"
SCORE_ATOL = 1e-5  # distributed vs single-process scores, per image
T = TypeVar("T")


# ---------------------------------------------------------------- Ray and Redis


@contextlib.contextmanager
def loopback_ray(num_cpus: int = 2) -> Iterator[Any]:
    """A local single-node Ray on 127.0.0.1 for the duration of the block."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("a Ray is already running in this process; the tests own their Ray")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address=LOOPBACK,
        log_to_driver=False,
        object_store_memory=256 << 20,
    )
    try:
        addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
        if addresses != {LOOPBACK}:
            raise RuntimeError(f"Ray bound {addresses}, expected only {LOOPBACK}")
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """$REDIS_URL, else the Redis at 127.0.0.1:6379, else a private loopback redis-server."""
    from patchaudit.scheduler.local_redis import RedisUnavailable, ensure_redis

    try:
        handle = ensure_redis()
    except RedisUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but no Redis: {exc}")
        pytest.skip(f"no Redis: {exc}")
    with handle:
        yield handle.url


@pytest.fixture
def run_ids(redis_url: str) -> Iterator[list[str]]:
    """Run ids a test uses; their Redis keys are deleted afterwards (runs otherwise keep them a week)."""
    import redis

    from patchaudit.queue.streams import BatchQueue

    ids: list[str] = []
    yield ids
    client = redis.Redis.from_url(redis_url)
    for run_id in ids:
        BatchQueue(client, run_id).delete()
    client.close()


def new_run_id(tag: str) -> str:
    return f"t-{tag}-{uuid.uuid4().hex[:8]}"


def run_config(redis_url: str, **run: Any) -> Any:
    """configs/default.yaml with run-section overrides (run_score uses only the run section)."""
    from patchaudit.scheduler.config import load_config

    config = load_config(str(DEFAULT_CONFIG))
    return dataclasses.replace(config, run=dataclasses.replace(config.run, redis_url=redis_url, **run).validate())


def wait_until(check: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail the test with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


def check_running(fut: Any) -> bool:
    """False while the run in `fut` goes on (so `check_running(fut) or ...` polls); fails the test once
    it has ended: a fault injected after that proves nothing."""
    if fut.done():
        pytest.fail(f"the run ended before the fault was injected: {fut.result()!r:.500}")
    return False


def run_actors(ray: Any, run_id: str) -> list[Any]:
    """The named actors of run `run_id` that Ray still lists (workers, shards, decode actors)."""
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if run_id in str(a)]


def actor_pids(name_prefix: str) -> dict[str, int]:
    """Name -> pid of the Ray cluster's actors (started or starting, not dead) whose name starts with
    `name_prefix`. From the GCS's actor table (Ray's private state API: it needs no dashboard, and it
    answers while an actor's process is SIGSTOPped); one place to change should Ray move it."""
    import ray

    return {
        a["Name"]: a["Pid"]
        for a in ray._private.state.actors().values()
        if a.get("Pid") and a.get("State") != "DEAD" and (a.get("Name") or "").startswith(name_prefix)
    }


def pid_of(worker: str) -> int:
    """The pid in a feature worker's name, fw<N>@<host>:<pid> (workers.actors.FeatureWorker)."""
    import socket

    host, pid = worker.split("@", 1)[1].rsplit(":", 1)
    assert host == socket.gethostname(), f"{worker} does not run on this host"
    return int(pid)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- data and models


def point_aws_at(mp: pytest.MonkeyPatch, s3_server: Any) -> None:
    """Point the standard AWS settings at a test S3 server (conftest's `S3Server`), away from any real
    AWS setup: the user's ~/.aws files and the metadata service are ignored. The same values in every
    test keep the environment identical, so stores reuse one cached client instead of one per test."""
    for var in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_RETRY_MODE",
        "AWS_MAX_ATTEMPTS",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    ):
        mp.delenv(var, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    mp.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    mp.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    mp.setenv("AWS_DEFAULT_REGION", s3_server.region)
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")


def place(src: Path, dst: Path) -> None:
    """Hard link (cheap) or copy; never a symlink (the file store refuses links leaving its root)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def bottle_test_images(bottle_dir: Path, per_type: int | None = None, seed: int = 0) -> list[Path]:
    """Bottle test images, all (per_type=None) or a seeded `per_type` from each of the 4 test folders."""
    rng = np.random.default_rng(seed)
    out: list[Path] = []
    for folder in sorted(p for p in (bottle_dir / "test").iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        if per_type is not None:
            files = [files[i] for i in sorted(rng.choice(len(files), min(per_type, len(files)), replace=False))]
        out += files
    return out


def link_images(images: Sequence[Path], root: Path, dst: Path) -> list[str]:
    """Place `images` under `dst` keeping their path relative to `root`; returns the keys, sorted."""
    keys = []
    for p in images:
        key = p.relative_to(root).as_posix()
        place(p, dst / key)
        keys.append(key)
    return sorted(keys)


def fit_small(
    bottle_dir: Path,
    out: Path,
    *,
    train_keys: Sequence[str] | None = None,
    n_train: int = 24,
    image_size: tuple[int, int] = (128, 128),
    shards: int = 1,
    seed: int = 0,
    folds: int = 2,
) -> str:
    """Fit default-config PatchCore (with overrides) on bottle train/good; returns the model's URI.

    `folds` calibration folds, 2 as in the `small_model` fixture: a model refitted here with the same images
    and settings gets that fixture's threshold (and two small coresets instead of five keep it quick).
    """
    from patchaudit.scheduler.config import load_config
    from patchaudit.store.objects import open_store
    from patchaudit.workers.datasets import discover, require_train
    from patchaudit.workers.fit import fit_model as fit

    config = load_config(str(DEFAULT_CONFIG)).model
    config = dataclasses.replace(
        config,
        image_size=tuple(image_size),
        patchcore=dataclasses.replace(config.patchcore, shards=shards),
        calibration=dataclasses.replace(config.calibration, folds=folds),
    ).validate()
    store = open_store(str(bottle_dir))
    if train_keys is None:
        keys = require_train(discover(store))
        pick = np.random.default_rng(seed).choice(len(keys), n_train, replace=False)
        train_keys = sorted(keys[i] for i in pick)
    model, _ = fit(config, store, list(train_keys))
    model.save(str(out))
    return open_store(str(out)).uri


def _set_threads(n: int) -> None:
    # torch and faiss share one OpenMP runtime in a process: setting either sets both.
    import faiss
    import torch

    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)


class _ShardThreadsIndex:
    """A bank index searched with the thread count of an index-shard actor, restoring the feature
    worker's count for the backbone afterwards (as if the search ran in another process)."""

    def __init__(self, index: Any, knn_threads: int, torch_threads: int) -> None:
        self.index, self.knn_threads, self.torch_threads = index, knn_threads, torch_threads

    def _call(self, method: str, *args: Any) -> Any:
        _set_threads(self.knn_threads)
        try:
            return getattr(self.index, method)(*args)
        finally:
            _set_threads(self.torch_threads)

    def search_torch(self, q: Any, k: int = 1) -> Any:
        return self._call("search_torch", q, k)

    def reconstruct(self, ids: Any) -> Any:
        return self._call("reconstruct", ids)


def knn_threads(summary: dict[str, Any]) -> int:
    """The faiss thread count the run's index shards searched with (from the summary's `shards`)."""
    threads = {s.get("threads") for s in summary["shards"]}
    assert len(threads) == 1 and None not in threads, f"shards report thread counts {threads}"
    return max(1, threads.pop())


def reference_scores(
    model_uri: str, input_uri: str, keys: Sequence[str], batch_size: int, knn_threads: int, torch_threads: int = 1
) -> dict[str, float | None]:
    """Single-process scores by key (None: undecodable), computed in the run's batches of `batch_size`
    with the actors' thread counts (module docstring)."""
    import torch

    from patchaudit.store.objects import open_store
    from patchaudit.workers.actors import WorkerSpec
    from patchaudit.workers.model import load_model
    from patchaudit.workers.pipeline import batched, score_keys

    src = open_store(input_uri)
    model = load_model(model_uri)
    index = _ShardThreadsIndex(model.index, knn_threads, torch_threads)
    out: dict[str, float | None] = {}
    before = torch.get_num_threads()
    _set_threads(torch_threads)
    try:
        for chunk in batched(sorted(keys), batch_size):  # the plan cuts the sorted listing like this
            for r in score_keys(
                model, src.read_bytes, chunk, index=index, batch_size=WorkerSpec.feature_batch, threads=2
            ):
                out[r.key] = r.score
    finally:
        _set_threads(before)
    return out


def upload_tree(local: Path, store: Any) -> list[str]:
    """Upload every file under `local` to `store`, keys relative to `local`; returns the keys."""
    keys = []
    for p in sorted(local.rglob("*")):
        if p.is_file():
            key = p.relative_to(local).as_posix()
            store.write_file(key, p)
            keys.append(key)
    return keys


# ---------------------------------------------------------------- reports


def report_rows(report_uri: str) -> list[dict[str, Any]]:
    from patchaudit.store import reports
    from patchaudit.store.objects import open_store

    return reports.read_report(open_store(report_uri)).to_pylist()


def assert_exactly_once(rows: Sequence[dict[str, Any]], expected_uris: Sequence[str]) -> None:
    """Every expected image has exactly one row, and there is no other row."""
    uris = [r["image_uri"] for r in rows]
    dupes = sorted({u for u in uris if uris.count(u) > 1})
    assert not dupes, f"{len(dupes)} image(s) have more than one row, e.g. {dupes[:3]}"
    missing = sorted(set(expected_uris) - set(uris))
    extra = sorted(set(uris) - set(expected_uris))
    assert not missing and not extra, f"missing rows {missing[:3]} (of {len(missing)}), extra rows {extra[:3]}"


def by_key(rows: Sequence[dict[str, Any]], input_uri: str) -> dict[str, dict[str, Any]]:
    """Report rows keyed by the object key under `input_uri`."""
    prefix = input_uri.rstrip("/") + "/"
    assert all(r["image_uri"].startswith(prefix) for r in rows), f"a row's image_uri is not under {prefix}"
    return {r["image_uri"][len(prefix) :]: r for r in rows}


def assert_scores_match(rows: Sequence[dict[str, Any]], input_uri: str, reference: dict[str, float | None]) -> None:
    """Each row's score equals the reference within SCORE_ATOL (errors where the reference has none)."""
    got = {k: r["score"] for k, r in by_key(rows, input_uri).items()}
    assert sorted(got) == sorted(reference), "the report and the reference cover different images"
    assert {k for k, s in got.items() if s is None} == {k for k, s in reference.items() if s is None}
    keys = sorted(k for k, s in reference.items() if s is not None)
    a = np.array([got[k] for k in keys], dtype=np.float64)
    b = np.array([reference[k] for k in keys], dtype=np.float64)
    worst = int(np.argmax(np.abs(a - b))) if len(a) else 0
    assert np.allclose(a, b, rtol=0.0, atol=SCORE_ATOL), (
        f"distributed scores differ from single-process ones by up to {abs(a[worst] - b[worst]):.3g} "
        f"(e.g. {keys[worst]}: {a[worst]!r} vs {b[worst]!r}); allowed {SCORE_ATOL}"
    )


def cli_score(
    tmp_path: Path, input_uri: str, model_uri: str, run_id: str, run: dict[str, Any], ray: Any
) -> tuple[list[str], dict[str, str], Path]:
    """(command, environment, report folder) of a `patchaudit score` child process on the test's Ray, with
    `run` written as the run config's `run` section."""
    import sys

    import yaml

    report, cfg = tmp_path / "report", tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run": run}))
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "HF_HUB_OFFLINE": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    cmd = [sys.executable, "-m", "patchaudit.scheduler.cli", "score", "--input", input_uri, "--model", model_uri]
    cmd += ["--report", str(report), "--config", str(cfg), "--run-id", run_id]
    return cmd, env, report
