"""A distributed scoring run: plan, enqueue, start actors, wait, finalise.

1. Plan (scheduler.plan, the same rules as `--single-process`): list the input once and cut it
   into batches; the listing snapshot and `run.json` are written only once Redis and Ray answered.
   A resumed run (same run id) re-reads the snapshot, so it cuts the same batches; a finished
   run returns its existing summary.
2. Queue: one Redis Stream per run (patchaudit.queue.streams); batches with a Parquet part in the
   report are not queued again, every other batch is, whatever Redis remembers.
3. Actors: one index-shard actor per bank shard (spread across nodes, restarted by Ray if they die)
   and N feature workers (a GPU each when the cluster has GPUs). A worker's heartbeat keeps its
   batch claimed; a feature worker that dies is replaced and its batch is reclaimed by the others
   once its heartbeat has been silent for reclaim_idle_s. On SIGINT/SIGTERM the actors are stopped
   and their batches given back; a (re)start gives back what consumers of an earlier start held.
4. Finish: dead-lettered batches become error rows, the report is checked to hold every listed
   image exactly once, then the summary and the success marker are written last.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from tqdm import tqdm

from patchaudit.errors import RayUnavailable, raise_terminated
from patchaudit.queue.connection import connect, redact_text, unavailable
from patchaudit.queue.messages import BatchMessage
from patchaudit.queue.streams import BatchQueue, QueueOptions
from patchaudit.scheduler.config import Config
from patchaudit.scheduler.finish import finish_report
from patchaudit.scheduler.local_redis import ensure_redis
from patchaudit.scheduler.plan import (
    Plan,
    RunError,
    batch_number,
    commit_plan,
    finished_summary,
    new_run_id,
    prepare_plan,
)
from patchaudit.store import listing as listings
from patchaudit.store import reports
from patchaudit.store.artifacts import read_manifest, verify_model
from patchaudit.store.objects import ObjectInfo, ObjectStore, open_store

__all__ = ["Plan", "RunError", "new_run_id", "run_score"]

log = logging.getLogger(__name__)
_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(?P<name>[A-Z]\w*(?:Error|Exception|Unavailable|Interrupt)):\s")

REDIS_TTL_S = 7 * 24 * 3600  # run state stays queryable by `patchaudit status` for a week


def _ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to RAY_ADDRESS, or start a local Ray on loopback. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # refused or unreachable: one line that says what to check
            raise RayUnavailable(describe_ray_error(exc, address)) from None
        return True
    # address="local": always a new private cluster, never silently join one `ray start` left running.
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    return True


def describe_ray_error(exc: BaseException, address: str) -> str:
    """Why the driver could not join the cluster at `address`, and what to set (token auth first)."""
    cause = redact_text(" ".join(str(exc).split()))[:300] or type(exc).__name__
    mode = os.environ.get("RAY_AUTH_MODE", "")
    has_token = any(os.environ.get(v) for v in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    if mode.lower() != "token":
        hint = (
            "clusters started with `ray start` use token authentication: set RAY_AUTH_MODE=token and the "
            "cluster's token in RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH=FILE; `ray get-auth-token` on the head "
            "prints it), then run again"
        )
    elif not has_token:
        hint = (
            "RAY_AUTH_MODE=token is set but no RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH: set the cluster's token "
            "(`ray get-auth-token` on the head prints it)"
        )
    else:
        hint = (
            "check that the head runs at that address and that RAY_AUTH_TOKEN is the cluster's token "
            "(`ray get-auth-token` on the head prints it)"
        )
    return f"cannot join the Ray cluster at RAY_ADDRESS={address} ({cause}); {hint}"


def run_score(
    config: Config,
    input_uri: str,
    model_uri: str,
    report_uri: str,
    run_id: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    listing: Sequence[ObjectInfo] | None = None,
) -> dict[str, Any]:
    """Score `input_uri` (or only `listing`, a subset of its objects) into the report at `report_uri`."""
    # A local Ray binds loopback only with this set, and it is read when ray is imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    rc = config.run
    run_id = run_id or new_run_id()
    src, report, model_store = open_store(input_uri), open_store(report_uri), open_store(model_uri)
    manifest = read_manifest(model_store)
    verify_model(model_store, manifest)  # a bad model fails here with its cause, before any actor starts
    t0 = time.perf_counter()
    finished = finished_summary(report, run_id)
    if finished is not None:
        return finished
    with ensure_redis(rc.redis_url) as handle:
        try:
            stats, placed, plan, todo = _run_queue(
                config,
                handle.url,
                connect(handle.url),
                run_id,
                src,
                model_store,
                report,
                manifest,
                workers,
                progress,
                listing,
            )
        except redis.RedisError as exc:  # lost beyond the client's reconnect tries, or refused
            raise unavailable(
                exc, handle.url, f"running {run_id} (finished parts are kept; re-run with --run-id {run_id} to resume)"
            ) from None
    seconds = time.perf_counter() - t0
    return finish_report(
        report,
        plan,
        model_id=manifest["model_id"],
        threshold=float(manifest["threshold"]),
        top_k=rc.top_k,
        seconds=seconds,
        extra={"input_uri": src.uri, "mode": "distributed", "workers": stats, **placed},
        images_now=todo.images,
    )


def _run_queue(
    config: Config,
    url: str,
    client: Any,
    run_id: str,
    src: ObjectStore,
    model_store: ObjectStore,
    report: ObjectStore,
    manifest: dict[str, Any],
    workers: int | None,
    progress: bool,
    listing: Sequence[ObjectInfo] | None,
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], Plan, Queued]:
    """Plan (once Redis answered), queue the batches without a part, drive the workers, turn dead
    letters into error rows. Returns the workers' counters, the actors' placements, the plan and
    the batches queued now."""
    rc = config.run
    queue = BatchQueue(
        client, run_id, QueueOptions(idle_ms=int(rc.reclaim_idle_s * 1000), max_attempts=rc.max_attempts)
    )
    created = queue.mark_starting(REDIS_TTL_S)  # `status` says "starting" while the input is listed
    started_ray = False
    try:
        plan = prepare_plan(
            report, src, run_id, rc.batch_size, manifest["model_id"], model_store.uri, "distributed", listing
        )
        if not plan.resumed:
            # Every service answered before the plan claims the report prefix: a run that cannot
            # start leaves the prefix free for the next one.
            started_ray = _ensure_ray()
            commit_plan(report, plan)
        reports.clear_complete(report)
        todo = queue_plan(queue, plan, report)
    except BaseException:
        if created:
            queue.delete()
        if started_ray:
            import ray

            ray.shutdown()
        raise
    stats: list[dict[str, Any]] = []
    placed: dict[str, list[dict[str, Any]]] = {"shards": []}
    try:
        if todo.batch_ids and not queue.is_finished():
            stats, placed = _drive(config, queue, plan, src, model_store, report, manifest, url, workers, progress)
    except BaseException as exc:  # failed or interrupted: say so in Redis, and let the keys expire
        _record_failure(queue, exc)
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    _finalise_dead_letters(queue, report, plan, manifest)
    queue.set_state("finished")
    for key in queue.keys.all():
        client.expire(key, REDIS_TTL_S)
    return stats, placed, plan, todo


@dataclass
class Queued:
    """What `queue_plan` queued: the batch ids without a part (in order) and their images."""

    batch_ids: list[str]
    images: int


def queue_plan(queue: Any, plan: Plan, report: ObjectStore) -> Queued:
    """Queue every planned batch that has no part in the report.

    The report's parts are the only truth about finished work; Redis only carries deliveries. Redis
    is made to agree with the parts first (`BatchQueue.reconcile`): a batch Redis remembers as done
    without a part (report deleted, Redis flushed and then a late ack, ...) is queued again, and the
    run's counters are recounted, so the run finishes exactly when every batch has a part.

    Batches are cut from the listing snapshot one row group at a time and pushed in pipelined
    chunks as they are cut: memory holds batch ids, never the listing.
    """
    have_parts = set(reports.list_parts(report))
    queue.reconcile(plan.batch_ids(), have_parts)
    queued = Queued([], 0)

    def todo() -> Iterator[BatchMessage]:
        for b in plan.iter_batches(report):
            if b.batch_id not in have_parts:
                queued.batch_ids.append(b.batch_id)
                queued.images += len(b.keys)
                yield b

    pushed = queue.enqueue(todo())
    # Consumers left from an earlier start of this run ended with that scheduler: hand their batches
    # out at once rather than after reclaim_idle_s.
    released = queue.release_all()
    queue.set_state("running")
    queue.set_error(None)  # a failure recorded by an earlier start no longer holds
    log.info(
        "run %s: %d batches planned, %d already in the report, %d queued now, %d given back by "
        "consumers of an earlier start",
        plan.run_id,
        plan.n_batches,
        plan.n_batches - len(queued.batch_ids),
        pushed,
        released,
    )
    return queued


def _drive(
    config: Config,
    queue: Any,
    plan: Plan,
    src: ObjectStore,
    model_store: ObjectStore,
    report: ObjectStore,
    manifest: dict[str, Any],
    redis_url: str,
    workers: int | None,
    progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Start the actors and wait until every batch is acked or dead-lettered.

    Returns the feature workers' counters and where each actor ran: {"shards": [...], "decoders": [...]}
    (node id, pid; decode actors with their counters, only in cluster decode).
    """
    import ray

    from patchaudit.workers.actors import FeatureWorker, IndexShardActor, WorkerSpec

    rc = config.run
    started_ray = _ensure_ray()
    # ray.init installs its own SIGTERM handler (exit 1, nothing cleaned up): SIGTERM must stop the
    # actors and give their batches back like Ctrl-C does.
    on_term = None
    if threading.current_thread() is threading.main_thread():
        on_term = signal.signal(signal.SIGTERM, raise_terminated)
    shard_handles: list[Any] = []
    running: dict[Any, Any] = {}  # run() ref -> feature worker handle, while it works
    decoders: list[Any] = []
    started: list[Any] = []  # feature workers created, before their run() is called
    try:
        n_gpus = int(ray.cluster_resources().get("GPU", 0))
        n_workers = workers or rc.feature_workers or max(1, n_gpus)
        check_resources(rc, ray.cluster_resources())
        for i, entry in enumerate(manifest.get("shards", [])):  # a method with a bank (PatchCore): one actor a shard
            shard_bytes = sum(manifest["files"][entry[k]]["size"] for k in ("vectors", "index", "file") if k in entry)
            shard_handles.append(
                IndexShardActor.options(  # type: ignore[attr-defined]  # a Ray actor class
                    num_cpus=0,
                    memory=int(shard_bytes * 1.5) + (64 << 20),
                    scheduling_strategy="SPREAD",
                    max_restarts=3,
                    max_task_retries=3,
                    name=f"shard-{plan.run_id}-{i}",
                    **({"resources": {rc.index_resource: 1}} if rc.index_resource else {}),
                ).remote(model_store.uri, i, rc.knn_backend)
            )
        placement_refs = [h.info.remote() for h in shard_handles]  # resolved while the run goes on
        cpus = ray.cluster_resources().get("CPU", 1)
        worker_cpus = 1.0
        n_decoders = decoders_for(rc, ray.cluster_resources(), n_workers * worker_cpus)
        decode_cpus = n_decoders * rc.decode_actor_cpus
        spec = WorkerSpec(
            run_id=plan.run_id,
            input_uri=src.uri,
            model_uri=model_store.uri,
            report_uri=report.uri,
            redis_url=redis_url,
            max_attempts=rc.max_attempts,
            reclaim_idle_ms=int(rc.reclaim_idle_s * 1000),
            batch_timeout_s=rc.batch_timeout_s,
            decode_threads=rc.decode_threads,
            pipeline_depth=rc.pipeline_depth,
            heatmaps=rc.heatmaps,
            knn_backend=rc.knn_backend,
            embeddings=rc.embeddings,
            # CPU-only: the cores the decode actors leave, shared among the workers
            torch_threads=max(1, int((cpus - decode_cpus) // n_workers)) if not n_gpus else 0,
            decode=rc.decode,
            decode_in_flight=rc.decode_in_flight,
        )
        res: dict[str, Any] = {"num_gpus": 1, "num_cpus": worker_cpus} if n_gpus else {"num_cpus": worker_cpus}
        if rc.worker_resource:
            res["resources"] = {rc.worker_resource: 1}
        spawned = 0
        watch = StartWatch(plan.run_id, "feature worker", res, rc.start_timeout_s)

        def start() -> Any:
            nonlocal spawned
            spawned += 1
            # Named so an operator (or a fault test) can find a worker: ray.get_actor(name).
            handle = FeatureWorker.options(  # type: ignore[attr-defined]  # a Ray actor class
                scheduling_strategy="SPREAD",
                max_restarts=0,
                name=f"worker-{plan.run_id}-{spawned}",
                **res,
            ).remote(spec, shard_handles, f"fw{spawned}")
            watch.add(handle)  # before run(): an actor runs its calls in order, so this one answers first
            return handle

        started = [start() for _ in range(n_workers)]
        # After the workers, so that they are placed first and the decode actors take the CPUs left.
        decoders = start_decoders(rc, plan.run_id, src.uri, n_decoders, ready_s=rc.start_timeout_s or None)
        for w in started:
            running[w.run.remote(decode_handles=decoders)] = w
        replacements_left = 2 * n_workers + 2
        bar = tqdm(
            total=queue.progress().total, desc=f"run {plan.run_id}", unit="batch", disable=None if progress else True
        )
        stats: list[dict[str, Any]] = []
        first_error = ""
        while True:
            watch.check()
            done, _ = ray.wait(list(running), timeout=0.5)
            for ref in done:
                running.pop(ref)
                try:
                    stats.append(ray.get(ref))
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, redis.RedisError):  # the worker lost Redis: so will we; say so once
                        raise cause from None
                    error = actor_error(exc)
                    first_error = first_error or error
                    log.warning("feature worker failed: %s", error)
                    if not queue.is_finished():
                        if replacements_left <= 0:
                            raise RunError(
                                f"feature workers keep failing; giving up. First error: {first_error}"
                            ) from None
                        replacements_left -= 1
                        w = start()
                        running[w.run.remote(decode_handles=decoders)] = w
            p = queue.progress()
            if p.total == 0:  # the run's keys are gone (Redis flushed, or restarted empty): nothing can finish
                raise RunError(
                    f"run {plan.run_id}'s state in Redis is gone (Redis flushed or restarted empty); "
                    f"re-run with --run-id {plan.run_id} to resume: the report's parts say what is done"
                )
            bar.total, bar.n = p.total, p.done_ok + p.dead
            bar.set_postfix(dead=p.dead, in_flight=p.in_flight)
            bar.refresh()
            if queue.is_finished():
                if running:  # workers notice within one claim timeout; give them a moment
                    ray.wait(list(running), num_returns=len(running), timeout=10)
                break
            if not running:
                raise RunError(
                    "all feature workers exited before the run finished"
                    + (f"; first error: {first_error}" if first_error else "")
                )
        bar.close()
        for ref in list(running):
            try:
                stats.append(ray.get(ref, timeout=1))
            except Exception:
                pass
        placed = {"shards": _placements(placement_refs)}
        if decoders:  # where they ran and what they did (their CPU seconds: benchmarks/throughput_model.py)
            placed["decoders"] = _placements([h.info.remote() for h in decoders])
        return stats, placed
    finally:
        # A dropped handle ends an actor only after its pending calls: a worker still starting (or
        # still in run()) would hold its CPU/GPU and the shards it uses until run() gives up (an
        # hour idle). The run is over or aborted, so stop every actor it started.
        for handle in [*running.values(), *started, *shard_handles, *decoders]:
            try:
                ray.kill(handle)
            except Exception:  # already dead
                pass
        if running:  # interrupted (SIGINT/SIGTERM) or failed: give their batches back for the next start
            try:
                queue.release_all()
            except Exception as exc:  # Redis gone too: a resume gives them back (release_all at start)
                log.warning("run %s: could not give back the batches in flight: %s", plan.run_id, exc)
        if started_ray:
            ray.shutdown()
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def check_resources(rc: Any, resources: dict[str, float]) -> None:
    """RunError when a custom resource the run's actors need (run.*_resource) is offered by no node."""
    names = [("worker_resource", rc.worker_resource), ("index_resource", rc.index_resource)]
    if rc.decode == "cluster":
        names.insert(0, ("decode_resource", rc.decode_resource))
    for what, name in names:
        if name and resources.get(name, 0) < 1:
            offered = sorted(k for k in resources if k not in ("CPU", "GPU", "memory", "object_store_memory"))
            offered = [k for k in offered if not k.startswith("node:")]
            raise RunError(
                f"run.{what} is {name!r} but no node of the Ray cluster offers it (custom resources offered: "
                f"{', '.join(offered) or 'none'}); start the nodes with `ray start --resources '{{\"{name}\": N}}'`"
            )


def decoders_for(rc: Any, resources: dict[str, float], worker_cpus: float) -> int:
    """How many decode actors a run starts: 0 in worker mode; `run.decode_actors`, or as many as the CPUs
    the feature workers leave allow (at least one, and at most the units of `decode_resource`)."""
    if rc.decode != "cluster":
        return 0
    cap = resources.get(rc.decode_resource, 0) if rc.decode_resource else float("inf")
    free = resources.get("CPU", 1) - worker_cpus
    return int(rc.decode_actors or max(1, min(free // rc.decode_actor_cpus, cap)))


def start_decoders(rc: Any, run_id: str, input_uri: str, n: int, ready_s: float | None = 600.0) -> list[Any]:
    """The run's `n` decode actors (CPU only), each reserving `decode_actor_cpus` and one unit of
    `decode_resource` when set; spread over the nodes and restarted by Ray whenever one dies (a request
    lost with one is redone by its worker). Those that find no place within `ready_s` (None: no limit)
    are stopped."""
    if n == 0:
        return []
    import ray

    from patchaudit.workers.decode_actors import DecodeActor

    opts: dict[str, Any] = {"num_cpus": rc.decode_actor_cpus}
    if rc.decode_resource:
        opts["resources"] = {rc.decode_resource: 1}
    handles = [
        DecodeActor.options(  # type: ignore[attr-defined]  # a Ray actor class
            scheduling_strategy="SPREAD",
            max_restarts=-1,  # a decode actor holds no state: bring it back whenever it dies
            max_concurrency=2,  # `info` answers while a batch decodes
            name=f"decode-{run_id}-{i}",
            **opts,
        ).remote(input_uri, rc.decode_threads)
        for i in range(n)
    ]
    refs = [h.info.remote() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ready_s)
    ready_set = set(ready)
    placed = [r in ready_set for r in refs]
    up = [h for h, ok in zip(handles, placed) if ok]
    for h, ok in zip(handles, placed):
        if not ok:  # no free CPUs (or resource) for it: it would hold its requests forever
            ray.kill(h)
    if not up:
        raise RunError(
            f"none of {n} decode actor(s) could be placed within {ready_s:.0f}s (run.start_timeout_s): "
            f"{_asks_and_free(opts)}; free CPUs on the cluster, or set run.decode_actors / decode_actor_cpus"
        )
    if len(up) < n:
        log.warning("run %s: %d of %d decode actors found no place; running with %d", run_id, n - len(up), n, len(up))
    log.info("run %s: %d decode actor(s) of %g CPU(s)", run_id, len(up), rc.decode_actor_cpus)
    return up


def _asks_and_free(asks: dict[str, Any]) -> str:
    """What one actor asks for and what the Ray cluster has free of it, e.g. for a start that waits."""
    import ray

    wanted = {"CPU": asks.get("num_cpus", 1), "GPU": asks.get("num_gpus", 0), **asks.get("resources", {})}
    wanted = {k: v for k, v in wanted.items() if v}
    free, total = ray.available_resources(), ray.cluster_resources()
    have = ", ".join(f"{k} {free.get(k, 0):g} of {total.get(k, 0):g}" for k in wanted)
    return f"each asks for {', '.join(f'{k} {v:g}' for k, v in wanted.items())}; the Ray cluster has free {have}"


class StartWatch:
    """The actors of one kind that a run created and that have not started yet (constructor not done).

    `check()` logs those still waiting once `timeout_s / 10` has passed (what they ask for and what the
    cluster has free: CPUs held by another run's actors, a GPU too few), and raises RunError when none
    ever started within `timeout_s` (0: never), instead of a run that waits without a word."""

    def __init__(self, run_id: str, what: str, asks: dict[str, Any], timeout_s: float) -> None:
        self.run_id, self.what, self.asks, self.timeout_s = run_id, what, asks, timeout_s
        self.waiting: dict[Any, float] = {}  # __ray_ready__ ref -> when its actor was created
        self.started = 0
        self.warned = False

    def add(self, handle: Any) -> None:
        self.waiting[handle.__ray_ready__.remote()] = time.monotonic()

    def check(self) -> None:
        if not self.waiting:
            return
        import ray

        ready, _ = ray.wait(list(self.waiting), num_returns=len(self.waiting), timeout=0)
        for ref in ready:  # started, or its constructor failed (its run() call then reports why)
            del self.waiting[ref]
            self.started += 1
        if not self.waiting or not self.timeout_s:
            return
        waited = time.monotonic() - min(self.waiting.values())
        if waited > self.timeout_s and not self.started:
            raise RunError(
                f"no {self.what} of run {self.run_id} could start within {self.timeout_s:g}s "
                f"(run.start_timeout_s): {_asks_and_free(self.asks)}. Another run's actors may hold them "
                "(`ray status`, `ray list actors`); free them, or ask for fewer (run.feature_workers)"
            )
        if waited > self.timeout_s / 10 and not self.warned:
            self.warned = True
            log.warning(
                "run %s: %d %s(s) still waiting to start after %.0fs: %s",
                self.run_id,
                len(self.waiting),
                self.what,
                waited,
                _asks_and_free(self.asks),
            )


def actor_error(exc: BaseException) -> str:
    """The root cause of a Ray actor/task failure in one line (e.g. "ArtifactError: model file ...")."""
    text = redact_text(str(exc))
    found = ""
    for line in text.splitlines():
        line = line.strip()
        m = _EXC_LINE.match(line)
        if m and not m["name"].startswith(("Ray", "ActorDied", "ActorUnavailable")):
            found = f"{m['name']}: {line[m.end() :]}"  # the last one is the innermost cause
    return (found or " ".join(text.split()))[:1000]


def _record_failure(queue: Any, exc: BaseException) -> None:
    """Mark a run that stopped early (error or interrupt) as failed, with why; its keys expire like a
    finished run's, so `status` shows it failed instead of pending forever. A re-run resumes it."""
    reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else redact_text(f"{type(exc).__name__}: {exc}")
    try:
        queue.set_state("failed")
        queue.set_error(reason)
        queue.expire(REDIS_TTL_S)
    except Exception as err:  # Redis itself may be what failed
        log.warning("run %s: could not record the failure in Redis: %s", queue.run_id, err)


def _placements(refs: list[Any]) -> list[dict[str, Any]]:
    """Each shard's first placement (node id, pid); a shard that never came up says why instead."""
    import ray

    out = []
    for i, ref in enumerate(refs):
        try:
            out.append(ray.get(ref, timeout=10))
        except Exception as exc:  # placement is informational: it must not fail a finished run
            out.append({"shard": i, "error": f"{type(exc).__name__}: {exc}"[:500]})
    return out


def _finalise_dead_letters(queue: Any, report: ObjectStore, plan: Plan, manifest: dict[str, Any]) -> None:
    """A dead-lettered batch's images become error rows (unless a complete part exists already).

    The rows are the planned batch's images (its slice of the listing snapshot), whatever keys the
    letter names: a message naming unlisted keys gets no rows for them, and loses no listed image.
    """
    have = set(reports.list_parts(report))
    letters = [d for d in queue.dead_letters() if d.keys and d.batch_id not in have]
    if not letters:
        return
    with plan.listing_path(report) as path:
        slices = listings.ListingSlices(path, report.uri_for(reports.LISTING_KEY))
        for letter in letters:
            n = batch_number(letter.batch_id)
            if n is None or n >= plan.n_batches:
                log.warning("run %s: dead letter for unplanned batch %r ignored", plan.run_id, letter.batch_id)
                continue
            rows = [
                _error_row(
                    plan.run_id,
                    info,
                    manifest,
                    letter.attempts,
                    f"dead-lettered after {letter.attempts} attempt(s): {letter.reason}",
                )
                for info in slices.slice(n * plan.batch_size, plan.batch_size)
            ]
            reports.write_part(report, letter.batch_id, rows)


def _error_row(run_id: str, info: ObjectInfo, manifest: dict[str, Any], attempt: int, error: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "image_uri": info.uri,
        "size": info.size,
        "etag": info.etag,
        "model_id": manifest["model_id"],
        "threshold": float(manifest["threshold"]),
        "attempt": attempt,
        "worker": "scheduler",
        "error": error,
    }
