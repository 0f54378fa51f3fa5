"""Thin Ray shells: index-shard actors (one shard of the memory bank each) and feature workers.

A feature worker claims batches from the run's Redis stream, decodes (or, with `run.decode: cluster`,
has the decode actors of workers/decode_actors.py decode) and embeds them, asks every
index shard for nearest distances ("ask every shard, merge"), computes scores and maps, writes the
batch's Parquet part (and heatmaps) to the report prefix, and only then acks. Any failure of a batch
goes back to the queue (`fail`: retry with backoff, dead letter after max attempts). While a worker
works a heartbeat keeps its claims alive and a time limit bounds each batch (workers/heartbeat.py);
a worker that dies stops its heartbeat, and another worker reclaims its batches after the idle timeout.
The claim/read, the scoring and the part write/ack overlap as stages (workers/feature_loop.py).

All the compute lives in Ray-free modules (pipeline, patchcore, knn, rows); this file only wires it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from patchaudit.queue.connection import connect
from patchaudit.queue.streams import BatchQueue, QueueOptions
from patchaudit.store import reports
from patchaudit.store.artifacts import read_manifest
from patchaudit.store.batch_listing import BatchListing
from patchaudit.store.objects import open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a feature worker needs, passed explicitly (no ambient config)."""

    run_id: str
    input_uri: str
    model_uri: str
    report_uri: str
    redis_url: str
    max_attempts: int = 3
    reclaim_idle_ms: int = 60_000
    batch_timeout_s: float = 1800.0  # a batch running longer fails (retried) and its result is dropped
    decode_threads: int = 2
    heatmaps: bool = True
    knn_backend: str = "auto"
    feature_batch: int = 0  # images per backbone forward pass; 0: the model's model.batch_size
    torch_threads: int = 0  # intra-op threads for torch on CPU (Ray sets OMP_NUM_THREADS=1); 0 = leave
    embeddings: bool = True  # write the batch's mining embeddings (embeddings/<batch_id>.parquet)
    decode: str = "worker"  # worker: decode here; cluster: ask the decode actors (workers/decode_actors.py)
    decode_in_flight: int = 2  # cluster: device batches requested and not yet scored, at most
    pipeline_depth: int = 3  # queue messages held at once: read ahead, on the device, being committed


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset); at least 1."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API on this OS
        return os.cpu_count() or 1


@ray.remote
class IndexShardActor:
    """Holds one shard of a PatchCore bank and answers k-NN queries with global ids."""

    def __init__(
        self, model_uri: str, shard: int, knn_backend: str = "auto", device: str = "auto", threads: int = 0
    ) -> None:
        # Idle OpenMP threads sleep instead of spinning: on a node shared with feature workers (decode
        # threads, torch), spinning waiters steal the cores the others need. It is read when the OpenMP
        # runtime loads, so it is set before torch/faiss are imported in this (dedicated) process.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        from patchaudit.workers.index_files import load_shard
        from patchaudit.workers.knn import FaissShard

        store = open_store(model_uri)
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.shard = load_shard(store, read_manifest(store), shard, knn_backend, dev)
        self.shard_no = shard
        self.threads = 0
        if torch.device(dev).type == "cpu":
            # Ray starts actors with OMP_NUM_THREADS=1: a CPU shard would search on one core, and the
            # k-NN is most of PatchCore's scoring time. Use the cores this process may run on (or `threads`).
            self.threads = threads or _usable_cpus()
            torch.set_num_threads(self.threads)
            if isinstance(self.shard, FaissShard):
                import faiss

                faiss.omp_set_num_threads(self.threads)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return self.shard.search(queries, k)

    def reconstruct(self, global_ids: np.ndarray) -> np.ndarray:
        return self.shard.reconstruct(np.asarray(global_ids) - self.shard.offset)

    def info(self) -> dict[str, Any]:
        return {
            "shard": self.shard_no,
            "offset": self.shard.offset,
            "ntotal": self.shard.ntotal,
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "threads": self.threads,
        }


class RemoteIndex:
    """The ShardedIndex interface over index-shard actors: fan out, merge (min distance)."""

    def __init__(self, handles: list[Any], offsets: list[int], sizes: list[int]) -> None:
        self.handles = handles
        self.offsets = offsets
        self.sizes = sizes

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        from patchaudit.workers.knn import merge_topk

        ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))  # one copy for all shards
        results = ray.get([h.search.remote(ref, k) for h in self.handles])
        return results[0] if len(results) == 1 else merge_topk(results, k)

    def search_torch(self, q, k: int = 1):
        import torch

        d, i = self.search(q.detach().float().cpu().numpy(), k)
        return torch.from_numpy(d).to(q.device), torch.from_numpy(i).to(q.device)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out: np.ndarray | None = None
        for h, off, n in zip(self.handles, self.offsets, self.sizes):
            mask = (ids >= off) & (ids < off + n)
            if mask.any():
                vecs = ray.get(h.reconstruct.remote(ids[mask]))
                out = np.empty((len(ids), vecs.shape[1]), np.float32) if out is None else out
                out[mask] = vecs
        if out is None:
            raise IndexError("ids outside the bank")
        return out


@ray.remote
class FeatureWorker:
    """Claims batches until the run is finished; returns its own counters."""

    def __init__(self, spec: WorkerSpec, shard_handles: list[Any], name: str) -> None:
        # Decode threads run beside torch's intra-op threads by design, so the cores are oversubscribed:
        # waiting OpenMP threads must sleep, not spin (read when torch loads its OpenMP runtime, below).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        from patchaudit.workers.model import load_model

        self.spec = spec
        self.name = f"{name}@{socket.gethostname()}:{os.getpid()}"
        self.queue = BatchQueue(
            connect(spec.redis_url),
            spec.run_id,
            QueueOptions(idle_ms=spec.reclaim_idle_ms, max_attempts=spec.max_attempts, block_ms=1000),
        )
        self.input = open_store(spec.input_uri)
        self.report = open_store(spec.report_uri)

        # The run's snapshot: size and etag as planned, and the only keys a message may name. Read by
        # slices (batch n is rows [n*B, (n+1)*B)), one row group cached: memory does not grow with it.
        self.listing = BatchListing(self.report)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.model = load_model(spec.model_uri, device=device, load_index=False)
        self.feature_batch = spec.feature_batch or self.model.config.batch_size
        self.index = None
        if self.model.needs_index:
            infos = ray.get([h.info.remote() for h in shard_handles])
            self.index = RemoteIndex(shard_handles, [i["offset"] for i in infos], [i["ntotal"] for i in infos])
        self.stats = {
            "worker": self.name,
            "node": ray.get_runtime_context().get_node_id(),
            "batches": 0,
            "images": 0,
            "failed_batches": 0,
            "skipped_batches": 0,
            "timed_out_batches": 0,
            "seconds": 0.0,
        }
        self.decoder: Any = None  # cluster decode: set by run()
        self._infos: dict[str, Any] = {}  # entry id -> the message's listing rows, from claim to commit
        self._release_on_sigterm()

    def _decode_client(self, handles: list[Any]) -> Any:
        """Cluster decode: a bounded client of the decode actors (None: this worker decodes itself)."""
        if self.spec.decode != "cluster":
            return None
        if not handles:
            raise ValueError("run.decode is cluster but the worker was given no decode actors")
        from patchaudit.workers.decode_actors import DecodeClient
        from patchaudit.workers.pipeline import decode_many

        prep, read, threads = self.model.preprocess, self.input.read_bytes, self.spec.decode_threads
        client = DecodeClient(
            handles,
            prep,
            self.spec.decode_in_flight,
            local=lambda keys: list(decode_many(read, keys, prep, threads)),
            start=os.getpid(),  # workers start on different actors
        )
        nodes = set()
        for ref in [h.info.remote() for h in handles]:  # where this worker's pixels come from (its counters)
            try:
                nodes.add(ray.get(ref, timeout=60)["node"])
            except ray.exceptions.RayError:  # restarting or gone: the client copes; this is informational
                pass
        client.stats["nodes"] = sorted(nodes)
        return client

    def _release_on_sigterm(self) -> None:
        """On SIGTERM (node shutdown, pod eviction) give back the held batch at once, then exit."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            try:
                self.queue.release(self.name)
            except Exception as exc:  # Redis gone: the batch is reclaimed after the idle timeout instead
                log.warning("%s: could not release its batch on SIGTERM: %s", self.name, exc)
            signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_term)

    def release(self) -> int:
        """Give back what this worker holds (the scheduler calls it on a clean shutdown)."""
        return self.queue.release(self.name)

    def ready(self) -> str:
        return self.name

    def run(self, max_idle_s: float = 3600.0, decode_handles: list[Any] | None = None) -> dict[str, Any]:
        """Work until every batch of the run is finished (acked or dead-lettered).

        Claiming and reading ahead, scoring, and writing parts behind overlap (workers.feature_loop);
        at most `pipeline_depth` messages are held at once. decode_handles: the run's decode actors
        (`run.decode: cluster`; started after the workers were placed, so they take the CPUs the
        workers leave): a message's images are then fetched from them instead of decoded here."""
        from patchaudit.workers.decode_actors import MessageFetcher
        from patchaudit.workers.feature_loop import FeatureLoop, LocalDecoder
        from patchaudit.workers.heartbeat import Heartbeats, interval_for

        self.decoder = self._decode_client(decode_handles or [])
        t0, cpu0 = time.perf_counter(), time.process_time()
        decoder: Any = LocalDecoder(
            self.input.read_bytes, self.model.preprocess, self.spec.decode_threads, gpu_decode=self._gpu_decode()
        )
        if self.decoder is not None:  # the decode actors, one request per device batch
            decoder.close()
            decoder = MessageFetcher(self.decoder, self.feature_batch)
        beats = Heartbeats(self.queue, interval_for(self.spec.reclaim_idle_ms), self.spec.batch_timeout_s)
        loop = FeatureLoop(
            self.queue,
            self.name,
            prepare=lambda d: self._prepare(d, decoder),
            compute=self._compute,
            commit=self._commit,
            beats=beats,
            depth=self.spec.pipeline_depth,
            stats=self.stats,
        )
        try:
            loop.run(max_idle_s)
        finally:
            decoder.close()
            self.stats["seconds"] = time.perf_counter() - t0
            self.stats["cpu_s"] = time.process_time() - cpu0  # this worker process, all its threads
            if self.decoder is not None:
                self.stats["decode"] = dict(self.decoder.stats)
        return self.stats

    def _gpu_decode(self) -> Any:
        """On a GPU with gpu_jpeg: a function decoding a message's JPEGs on the device, else None."""
        if not (self.model.device.type == "cuda" and self.model.config.gpu_jpeg):
            return None
        from patchaudit.workers.pipeline import decode_batches_gpu

        def decode(keys: Any) -> list[Any]:
            batches = decode_batches_gpu(
                self.input.read_bytes,
                list(keys),
                self.model.preprocess,
                self.feature_batch,
                self.model.device,
                self.spec.decode_threads,
            )
            return [d for batch in batches for d in batch]

        return decode

    def _prepare(self, delivery: Any, decoder: Any) -> Any:
        """Check a claimed message and start reading and decoding its images (None: nothing to score)."""
        keys = list(delivery.message.keys)
        if self.report.exists(reports.part_key(delivery.batch_id)):
            # A previous try wrote the part and died before acking (parts are written whole,
            # as the last step): the result is there, so only the ack is missing.
            return None
        # LookupError unless the keys are the batch's listed images; kept for the commit stage (the
        # listing is read here only, in the feeder thread).
        self._infos[delivery.entry_id] = self.listing.infos(delivery.batch_id, keys)
        # A missing or unreadable object becomes an error row, not a batch failure.
        return decoder.submit(keys)

    def _compute(self, delivery: Any, fetched: Any) -> list[Any]:
        """Score a message's decoded images on the device, `feature_batch` images per forward pass."""
        import torch

        from patchaudit.workers.pipeline import score_decoded

        items, bs, results = fetched.items, self.feature_batch, []
        with torch.inference_mode():
            for s in range(0, len(items), bs):
                results += score_decoded(
                    self.model,
                    items[s : s + bs],
                    self.index,
                    keep_maps="anomalous" if self.spec.heatmaps else False,
                    keep_images=self.spec.heatmaps,
                    embeddings=self.spec.embeddings,
                )
        return results

    def _commit(self, delivery: Any, results: list[Any]) -> None:
        """The message's rows (and heatmaps), embeddings, then its part: the part is the batch's commit."""
        from patchaudit.store.embeddings import write_embeddings
        from patchaudit.workers.rows import build_embeddings, build_rows

        infos = self._infos.pop(delivery.entry_id)  # looked up when the message was claimed
        rows = build_rows(
            results,
            infos,
            self.spec.run_id,
            self.model,
            delivery.attempt,
            self.name,
            self.report if self.spec.heatmaps else None,
        )
        vectors = build_embeddings(results, infos, self.model) if self.spec.embeddings else None
        if vectors is not None:  # before the part: the part is the batch's commit
            write_embeddings(self.report, delivery.batch_id, vectors)
        reports.write_part(self.report, delivery.batch_id, rows)
