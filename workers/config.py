"""Model configuration: frozen dataclasses validated from plain dicts (YAML), unknown keys are errors.

`from_dict` is the one validator used for every config section (the scheduler's run config too):
it checks key names against the dataclass fields, coerces lists to tuples and ints to floats, and
reports the full dotted path of a bad value together with what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from patchaudit.errors import ConfigError
from patchaudit.workers.registry import method_names

T = TypeVar("T")

METHODS = method_names()  # the registry is the one list of methods


@dataclass(frozen=True)
class PatchCoreConfig:
    patch_size: int = 3  # local neighbourhood aggregated around each patch
    feature_dim: int | None = None  # optional channel reduction of the concatenated embedding
    coreset_ratio: float = 0.1
    coreset_projection_dim: int | None = 128
    coreset_method: str = "batched"  # batched | pruned (both exact greedy, fast) | dense (textbook loop)
    score: str = "max"  # max | reweighted (the paper's eq. 7)
    reweight_neighbors: int = 3  # b in the paper's reweighting
    shards: int = 1
    index: str = "flat"  # flat (exact) | hnsw | ivf (approximate: measure recall before use)
    hnsw_ef_search: int = 128
    ivf_nprobe: int = 16

    def validate(self) -> None:
        _check_choice("model.patchcore.score", self.score, ("max", "reweighted"))
        _check_choice("model.patchcore.index", self.index, ("flat", "hnsw", "ivf"))
        _check_choice("model.patchcore.coreset_method", self.coreset_method, ("batched", "pruned", "dense"))
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"model.patchcore.coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ConfigError(f"model.patchcore.patch_size must be a positive odd integer, got {self.patch_size}")
        for name in ("shards", "reweight_neighbors", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.patchcore.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("feature_dim", "coreset_projection_dim"):  # optional: null switches them off
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"model.patchcore.{name} must be >= 1 or null, got {getattr(self, name)}")


@dataclass(frozen=True)
class PadimConfig:
    n_features: int = 100  # random channel subset size d
    eps: float = 0.01  # covariance regulariser added to the shrinkage estimate

    def validate(self) -> None:
        if self.n_features < 1:
            raise ConfigError(f"model.padim.n_features must be >= 1, got {self.n_features}")
        if self.eps < 0:
            raise ConfigError(f"model.padim.eps must be >= 0, got {self.eps}")


@dataclass(frozen=True)
class GaussianConfig:
    eps: float = 1e-6

    def validate(self) -> None:
        if self.eps < 0:
            raise ConfigError(f"model.gaussian.eps must be >= 0, got {self.eps}")


@dataclass(frozen=True)
class CalibrationConfig:
    holdout: float = 0.1  # share of the defect-free training images kept out of the fit
    quantile: float = 0.99  # threshold = this quantile of the held-out images' scores ...
    margin: float = 1.0  # ... times this factor

    def validate(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"model.calibration.holdout must be in (0, 1), got {self.holdout}")
        if not 0.0 < self.quantile <= 1.0:
            raise ConfigError(f"model.calibration.quantile must be in (0, 1], got {self.quantile}")
        if self.margin <= 0:
            raise ConfigError(f"model.calibration.margin must be > 0, got {self.margin}")


@dataclass(frozen=True)
class ModelConfig:
    method: str = "patchcore"
    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = None  # explicit local weights file; else offline packages; else timm hub
    layers: tuple[int, ...] = (2, 3)  # timm features_only out_indices
    image_size: tuple[int, int] = (256, 256)  # (height, width); no center crop by default
    center_crop: tuple[int, int] | None = None
    map_sigma: float = 4.0
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    patchcore: PatchCoreConfig = field(default_factory=PatchCoreConfig)
    padim: PadimConfig = field(default_factory=PadimConfig)
    gaussian: GaussianConfig = field(default_factory=GaussianConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self) -> ModelConfig:
        _check_choice("model.method", self.method, METHODS)
        if not self.layers:
            raise ConfigError("model.layers must name at least one feature level (timm out_indices)")
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ConfigError(f"model.image_size must be [height, width] >= 32, got {list(self.image_size)}")
        if self.center_crop is not None:
            crop = self.center_crop
            # the crop is what the backbone sees, so it has image_size's lower bound
            if len(crop) != 2 or min(crop) < 32 or any(c > s for c, s in zip(crop, self.image_size)):
                raise ConfigError(
                    f"model.center_crop must be [height, width] between 32 and image_size {list(self.image_size)}, "
                    f"got {list(crop)}"
                )
        if self.batch_size < 1:
            raise ConfigError(f"model.batch_size must be >= 1, got {self.batch_size}")
        if self.map_sigma < 0:
            raise ConfigError(f"model.map_sigma must be >= 0, got {self.map_sigma}")
        for sub in (self.patchcore, self.padim, self.gaussian, self.calibration):
            sub.validate()
        return self


def _check_choice(path: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{path}: {value!r} is not valid; choose one of: {', '.join(valid)}")


def from_dict(cls: type[T], data: Any, path: str) -> T:
    """Build dataclass `cls` from `data`, checking every key and value; errors name the dotted path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be ints or bools too
    if unknown:
        names = ", ".join(f"{path}.{key}" for key in unknown)
        raise ConfigError(f"unknown key(s) {names}; allowed in {path}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of the allowed types")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path} must be a list of {len(args)} values, got {list(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # a bug in our dataclasses, not user input


def model_config_from_dict(data: Any) -> ModelConfig:
    return from_dict(ModelConfig, data, "model").validate()
