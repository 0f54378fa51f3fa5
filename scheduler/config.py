"""The config file: one YAML document with a `model` section and a `run` section, validated at load.

Unknown keys anywhere are errors that name the allowed keys. The loaded objects are passed down
explicitly; nothing is kept in globals. This module does not import torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from patchaudit.errors import ConfigError
from patchaudit.workers.config import ModelConfig, from_dict, model_config_from_dict


@dataclass(frozen=True)
class RunConfig:
    batch_size: int = 32  # images per queue message (one report part each)
    feature_workers: int = 0  # 0 = one per GPU, or 1 on a CPU-only cluster
    decode_threads: int = 2  # per feature worker
    max_attempts: int = 3  # then the batch is dead-lettered and its images become error rows
    reclaim_idle_s: float = 300.0  # a batch held this long by a silent worker is reclaimed
    heatmaps: bool = True  # write a heatmap PNG for every anomalous image
    top_k: int = 20  # most anomalous images listed in the summary
    redis_url: str | None = None  # default: $REDIS_URL, else redis://127.0.0.1:6379, else a private server
    knn_backend: str = "auto"  # auto | faiss | torch

    def validate(self) -> RunConfig:
        for name in ("batch_size", "decode_threads", "max_attempts", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        if self.feature_workers < 0:
            raise ConfigError(f"run.feature_workers must be >= 0, got {self.feature_workers}")
        if self.reclaim_idle_s <= 0:
            raise ConfigError(f"run.reclaim_idle_s must be > 0, got {self.reclaim_idle_s}")
        if self.knn_backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"run.knn_backend: {self.knn_backend!r} is not valid; choose auto, faiss or torch")
        return self


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)


def config_from_dict(data: Any, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'model' and/or 'run'")
    unknown = sorted((str(k) for k in set(data) - {"model", "run"}))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; allowed: model, run")
    try:
        return Config(
            model=model_config_from_dict(data.get("model")),
            run=from_dict(RunConfig, data.get("run"), "run").validate(),
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | None) -> Config:
    """Load and validate a YAML config file; None gives the defaults."""
    if path is None:
        return Config()
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return config_from_dict(data, path)
