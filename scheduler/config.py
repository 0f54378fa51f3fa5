"""The config file: one YAML document with a `model` section and a `run` section, validated at load.

Unknown keys anywhere are errors that name the allowed keys. `python -m patchaudit.scheduler.config
--defaults` prints configs/default.yaml: every key with its default and meaning, from the schema.
The loaded objects are passed down explicitly; nothing is kept in globals. This module does not import torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import yaml

from patchaudit.errors import ConfigError
from patchaudit.schema import Schema, dump_defaults, from_dict, opt
from patchaudit.workers.config import ModelConfig, model_config_from_dict


@dataclass(frozen=True)
class RunConfig(Schema):
    schema_path: ClassVar[str] = "run."

    batch_size: int = opt(32, "images per queue message (one report part each)", ge=1)
    feature_workers: int = opt(0, "feature workers; 0: one per GPU, or one on a CPU-only cluster", ge=0)
    decode_threads: int = opt(2, "image-decoding threads per feature worker", ge=1)
    pipeline_depth: int = opt(
        3,
        "queue messages a feature worker holds at once: the next ones claimed, read and decoded while "
        "one is on the device and the previous one's part is written and acked; 1 runs them one after "
        "another",
        ge=1,
        le=64,
    )
    max_attempts: int = opt(3, "tries per batch; then it is dead-lettered and its images become error rows", ge=1)
    reclaim_idle_s: float = opt(
        60.0,
        "a batch whose worker's heartbeat stopped this long ago (the worker died or lost Redis) is "
        "reclaimed by another; a live worker keeps its batch however long it takes",
        gt=0,
    )
    batch_timeout_s: float = opt(
        1800.0,
        "a batch still running after this long fails (retried, then dead-lettered) and its result "
        "is dropped; a worker that stays stuck is replaced. Counted from its claim: a batch read ahead "
        "waits behind at most pipeline_depth - 1 others",
        gt=0,
    )
    start_timeout_s: float = opt(
        600.0,
        "a run none of whose feature workers (or decode actors) could start within this long fails, "
        "saying what each asks for and what the Ray cluster has free (CPUs held by another run's actors, "
        "a GPU too few); workers still waiting are reported after a tenth of it; 0: wait forever",
        ge=0,
    )
    heatmaps: bool = opt(True, "write a heatmap PNG for every anomalous image")
    top_k: int = opt(20, "most anomalous images listed in the run summary", ge=1)
    redis_url: str | None = opt(
        None,
        "the queue's Redis; null: $REDIS_URL, else redis://127.0.0.1:6379, else a private server started for the run",
    )
    knn_backend: str = opt(
        "auto",
        "k-NN search of PatchCore banks: auto is torch for exact (flat) banks and on GPUs, faiss for "
        "ivf/hnsw; faiss or torch force one",
        choices=("auto", "faiss", "torch"),
    )
    embeddings: bool = opt(
        True,
        "store each scored image's mining embedding (pooled and peak feature, float16) in "
        "embeddings/<batch>.parquet, for `patchaudit similar` and `cluster`",
    )
    decode: str = opt(
        "worker",
        "where images are decoded: worker (each feature worker decodes its own batches on its node's "
        "cores, in decode_threads threads) or cluster (CPU-only decode actors on any node with free CPUs, "
        "GPU nodes included, hand each feature worker its batches as uint8 arrays at model resolution "
        "through Ray's object store; the feature worker then only runs the model). Scores are the same",
        choices=("worker", "cluster"),
    )
    decode_actors: int = opt(
        0,
        "decode: cluster: how many decode actors; 0: as many as the cluster's CPUs left free by the feature "
        "workers hold (at least one)",
        ge=0,
    )
    decode_actor_cpus: float = opt(
        1.0, "decode: cluster: CPUs each decode actor reserves (it decodes in decode_threads threads)", gt=0
    )
    decode_in_flight: int = opt(
        2,
        "decode: cluster: device batches each feature worker has requested from the decode actors and not "
        "yet scored, at most (backpressure: the object store holds at most this many decoded batches per "
        "worker)",
        ge=1,
    )
    decode_resource: str | None = opt(
        None,
        "decode: cluster: a Ray custom resource each decode actor needs one unit of, to place the decode "
        "actors on the nodes that offer it (e.g. `ray start --resources '{\"decode\": 16}'`); null: any node "
        "with free CPUs",
        nonempty=True,
    )
    worker_resource: str | None = opt(
        None,
        "a Ray custom resource each feature worker needs one unit of, to place them on the nodes that offer "
        "it; null: any node (one with a GPU when the cluster has GPUs)",
        nonempty=True,
    )
    index_resource: str | None = opt(
        None,
        "a Ray custom resource each k-NN index shard actor needs one unit of, to place the shards on the nodes "
        "that offer it (e.g. the feature workers' nodes, so queries and answers stay on the node); null: "
        "spread over the cluster",
        nonempty=True,
    )


@dataclass(frozen=True)
class Config(Schema):
    model: ModelConfig = opt(ModelConfig, "what is fitted: the method, its backbone and options")
    run: RunConfig = opt(RunConfig, "how `patchaudit score` runs: queue, workers, report")


DEFAULTS_HEADER = """patchaudit configuration: every key, at its default, with its meaning.
Generated from the schema by `make configs` (python -m patchaudit.scheduler.config --defaults); do not edit.
A config file may set any subset of these keys; an unknown key or a bad value is an error that says what is allowed."""


def defaults_yaml() -> str:
    """The text of configs/default.yaml."""
    return dump_defaults(Config, DEFAULTS_HEADER)


def config_from_dict(data: Any, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'model' and/or 'run'")
    unknown = sorted(str(k) for k in set(data) - {"model", "run"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; allowed: model, run")
    try:
        return Config(model=model_config_from_dict(data.get("model")), run=from_dict(RunConfig, data.get("run"), "run"))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | None) -> Config:
    """Load and validate a YAML config file; None gives the defaults."""
    if path is None:
        return Config()

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return config_from_dict(data, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m patchaudit.scheduler.config", description="Check a config file, or print the defaults."
    )
    p.add_argument("--defaults", action="store_true", help="print every key with its default and meaning (YAML)")
    p.add_argument("config", nargs="?", help="a YAML config to validate")
    args = p.parse_args(argv)
    if args.defaults:
        sys.stdout.write(defaults_yaml())
        return 0
    if not args.config:
        p.error("give --defaults or a config file")
    try:
        load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
