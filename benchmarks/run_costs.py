"""The CPU a cluster-decode run spends besides its decode and feature stages, measured on this machine.

Used by benchmarks/throughput_model.py (`--validate`) before its predictions; each measurement is its
own small run, never the validated run:

- `loop_cpu_ms`: the feature worker's loop around the model, per image: claim, the message's listing
  rows, rows + embeddings + the Parquet part, ack, heartbeats (the real `FeatureWorker` code path, in
  a `patchaudit score` run of zero-byte images: every image is an error row, no model work; what the
  real rows and embeddings add is measured in-process by `commit_cpu_ms`);
- `transfer_cpu_ms`: handing one decoded batch (`feature_batch` images at the model's size) from an
  actor to another process through Ray's object store, per image, in the whole process tree (the
  producer's put, the consumer's get, raylet's object manager between two nodes);
- `background_cores`: Ray's CPU while a run's cluster is up and idle (raylet, GCS, the agents, the
  driver's polling), in cores.

CPU seconds, not wall time: on a shared machine they do not move with the neighbours' load.
`RoleCpu` splits a run's process tree by role (driver, gcs, raylet, each actor class, other Ray
processes) from /proc, for the per-process accounting of a validation run. Linux only.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(1, str(Path(__file__).resolve().parent))  # sibling scripts: proc_cpu
from proc_cpu import process_tree  # noqa: E402

ROLES = (
    ("ray::DecodeActor", "decode_actors"),
    ("ray::FeatureWorker", "feature_worker"),
    ("ray::IndexShardActor", "index_actor"),
    ("ray::Producer", "producer"),
    ("ray::Consumer", "consumer"),
    ("raylet", "raylet"),
    ("gcs_server", "gcs"),
)


def _role(cmdline: str, driver: int, pid: int) -> str:
    if pid == driver:
        return "driver"
    first = cmdline.split(" ", 1)[0]
    for prefix, role in ROLES:
        if first.startswith(prefix) or (prefix in ("raylet", "gcs_server") and first.endswith("/" + prefix)):
            return role
    return "other_ray"


class RoleCpu:
    """CPU seconds of this process and its descendants by role, sampled from /proc every `interval` s
    (a process that exits keeps what it had used at its last sample)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.driver = os.getpid()
        self._base: dict[tuple[int, str], float] = {}
        self._seen: dict[tuple[int, str], tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._first = True
        self.series: list[tuple[float, dict[str, float]]] = []  # (wall time, CPU seconds per role so far)

    def _read(self) -> dict[tuple[int, str], tuple[str, float]]:
        out = {}
        for pid, (start, cpu) in process_tree(self.driver).items():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            out[(pid, start)] = (_role(cmd, self.driver, pid), cpu)
        return out

    def sample(self) -> None:
        for key, (role, cpu) in self._read().items():
            self._base.setdefault(key, cpu if self._first else 0.0)  # new processes count from zero
            # An idle Ray worker becomes an actor (its title changes); an exiting one has no title left.
            if role == "other_ray" and key in self._seen:
                role = self._seen[key][0]
            self._seen[key] = (role, cpu)
        self._first = False
        self.series.append((time.time(), self.totals()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> RoleCpu:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """CPU seconds per role since `start`."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.totals()

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, (role, cpu) in self._seen.items():
            out[role] = out.get(role, 0.0) + cpu - self._base[key]
        return out


def cpu_between(series: list[tuple[float, dict[str, float]]], t0: float, t1: float) -> dict[str, float]:
    """CPU seconds per role between wall times t0 and t1 (linear between samples)."""

    def at(t: float) -> dict[str, float]:
        prev = series[0]
        for cur in series:
            if cur[0] >= t:
                w = (t - prev[0]) / (cur[0] - prev[0]) if cur[0] > prev[0] else 1.0
                keys = set(prev[1]) | set(cur[1])
                return {k: prev[1].get(k, 0.0) + w * (cur[1].get(k, 0.0) - prev[1].get(k, 0.0)) for k in keys}
            prev = cur
        return series[-1][1]

    a, b = at(t0), at(t1)
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


def redis_cpu_s(url: str) -> float:
    """redis-server's own CPU seconds so far (INFO cpu; shared with whatever else uses this Redis)."""
    import redis

    info: Any = redis.Redis.from_url(url).info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


# --------------------------------------------------------------------------- the loop around the model


def zero_cost_loop_ms(model_uri: str, workdir: Path, files: int, batch_size: int) -> float:
    """The feature worker's CPU ms per image with no model work: a real `patchaudit score` run (local Ray,
    one worker, decode in the worker) of `files` zero-byte images, every one an error row
    (benchmarks/orchestration.py, its machinery); the worker process's own CPU, start-up excluded."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import orchestration  # type: ignore[import-not-found]

    orchestration.make_empty_files(workdir / "empty", files)
    report = workdir / "empty_report"
    shutil.rmtree(report, ignore_errors=True)
    r = orchestration.run_child(argparse.Namespace(set=[]), batch_size, str(workdir / "empty"), model_uri, report)
    return float(r["worker_cpu_ms_per_image"])


# --------------------------------------------------------------------------- object-store handoff


def handoff_costs(
    batch: int, pixels: tuple[int, int, int], queries: tuple[int, int], two_node: bool, batches: int = 60
) -> dict[str, float]:
    """CPU ms per image of handing decoded batches from a decode actor to a feature worker through Ray's
    object store, and of the worker's k-NN round trip to an index actor; Ray's idle CPU in cores.

    On a fresh local Ray (one node, or two on loopback: the producer on one node, the consumer on the
    other, as `--validate` places decode actors and the worker) a `Producer` actor returns a
    `DecodedBatch` of `batch` images of `pixels` (h, w, 3) per call (serialised into the object store
    each time) and a `Consumer` actor takes `batches` of them with two requests in flight (ray.get,
    `unpack`, a read of every image); then it sends `batches` x `batch` x `queries` (patches, dim)
    float32 queries to an index actor (on its node) that answers without searching ((n, 1) distances
    and ids), as `RemoteIndex.search` does. The process tree's CPU over each loop, less Ray's idle rate
    measured just before with the same actors up, per image: `transfer_out_ms` on the producer's side
    (its process), `transfer_in_ms` on the consumer's, with what Ray's daemons and the driver add split
    evenly between the two; `knn_round_trip_ms` all on the consumer's node."""
    import numpy as np
    import ray

    from patchaudit.workers.decode import DecodedImage
    from patchaudit.workers.decode_stage import Decoded, DecodedBatch, pack, unpack

    @ray.remote
    class Producer:
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            items = [
                Decoded(f"{i}", DecodedImage(rng.integers(0, 256, pixels, dtype=np.uint8), pixels[:2]), None, 1.0)
                for i in range(batch)
            ]
            self.batch = pack(items)

        def decode(self) -> DecodedBatch:
            return self.batch

    @ray.remote
    class Index:
        def search(self, q: Any, k: int = 1) -> tuple[Any, Any]:
            return np.zeros((len(q), k), np.float32), np.zeros((len(q), k), np.int64)

    @ray.remote
    class Consumer:
        def take(self, producer: Any, n: int) -> float:
            pending = [producer.decode.remote() for _ in range(min(2, n))]
            total = 0
            for i in range(n):
                items = unpack(ray.get(pending.pop(0)))
                if i + 2 < n:
                    pending.append(producer.decode.remote())
                total += sum(int(it.image.pixels[-1, -1, 0]) for it in items if it.image is not None)
            return float(total)

        def ask(self, index: Any, n: int) -> float:
            q = np.random.default_rng(1).standard_normal((batch * queries[0], queries[1])).astype(np.float32)
            return float(sum(ray.get(index.search.remote(ray.put(q), 1))[0].sum() for _ in range(n)))

    cluster = _start_ray(two_node)
    try:
        # the consumer and the index actor share the `features` node (half a unit each)
        place = ({"resources": {"decode": 1}}, {"resources": {"features": 0.5}}) if two_node else ({}, {})
        producer = Producer.options(num_cpus=0, **place[0]).remote()  # type: ignore[attr-defined]
        consumer = Consumer.options(num_cpus=0, **place[1]).remote()  # type: ignore[attr-defined]
        index = Index.options(num_cpus=0, **place[1]).remote()  # type: ignore[attr-defined]
        ray.get([consumer.take.remote(producer, 4), consumer.ask.remote(index, 4)])  # every actor up, warm
        time.sleep(2.0)
        idle = RoleCpu(interval=0.25).start()
        time.sleep(4.0)
        bg = sum(idle.stop().values()) / (idle.series[-1][0] - idle.series[0][0])
        phases = {}
        for name, call in (
            ("take", lambda: consumer.take.remote(producer, batches)),
            ("ask", lambda: consumer.ask.remote(index, batches)),
        ):
            roles = RoleCpu(interval=0.25).start()
            ray.get(call())
            cpu = roles.stop()
            phases[name] = (cpu, roles.series[-1][0] - roles.series[0][0])
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    images = batches * batch

    def rest(cpu: dict[str, float], wall: float, mine: tuple[str, ...]) -> float:
        """What Ray's daemons, idle workers and the driver used beyond their idle rate (CPU s)."""
        return max(0.0, sum(v for k, v in cpu.items() if k not in mine) - bg * wall)

    take, take_wall = phases["take"]
    shared = rest(take, take_wall, ("producer", "consumer")) / 2
    ask, ask_wall = phases["ask"]  # the index actor has no role of its own: it is among `other_ray`
    return {
        "transfer_out_ms": 1e3 * (take.get("producer", 0.0) + shared) / images,
        "transfer_in_ms": 1e3 * (take.get("consumer", 0.0) + shared) / images,
        "knn_round_trip_ms": 1e3 * (ask.get("consumer", 0.0) + rest(ask, ask_wall, ("consumer",))) / images,
        "background_cores": bg,
    }


def _start_ray(two_node: bool) -> Any:
    """A fresh local Ray: one node, or two on loopback offering `decode` and `features` (None: one node)."""
    import ray

    if not two_node:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False
        )
        return None
    from ray.cluster_utils import Cluster

    node = {"node_ip_address": "127.0.0.1", "object_store_memory": 256 << 20}
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={**node, "num_cpus": 2, "resources": {"decode": 2}, "include_dashboard": False},
    )
    cluster.add_node(**node, num_cpus=1, resources={"features": 1})
    cluster.wait_for_nodes()
    return cluster
