"""Anomaly-detection methods by name: one table, filled in by the methods' own files.

`METHODS` lists every method with the module that defines its model class, its config section under
`model:` and its defaults for method comparison. A method's file marks its class with
`@register("name")`; `model_class(name)` imports that module on first use, so each method pulls in
only what it needs (and this module pulls in nothing heavy: the config imports it).

Adding a method touches its own file (the model class, `@register`) and this table; if it has
options, they are one config section (a dataclass) named by `section`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from patchaudit.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    from patchaudit.workers.model import AnomalyModel

ModelT = TypeVar("ModelT", bound="type[AnomalyModel]")


@dataclass(frozen=True)
class MethodInfo:
    module: str  # the module whose import registers the model class
    section: str | None  # its config section under `model:` (None: no options of its own)
    layers: tuple[int, ...]  # feature levels (timm out_indices) it uses in a method comparison
    short: str  # abbreviation in plot labels
    summary: str


METHODS: dict[str, MethodInfo] = {
    "patchcore": MethodInfo(
        "patchaudit.workers.patchcore",
        "patchcore",
        (2, 3),
        "pc",
        "memory bank of patch features, k-NN distance (Roth et al., CVPR 2022)",
    ),
    "padim": MethodInfo(
        "patchaudit.workers.padim_model",
        "padim",
        (1, 2, 3),
        "padim",
        "a Gaussian per patch position, Mahalanobis distance (Defard et al., 2020)",
    ),
    "gaussian": MethodInfo(
        "patchaudit.workers.gaussian_model",
        "gaussian",
        (0, 1, 2, 3, 4),
        "gauss",
        "one Gaussian per feature level of pooled features, image-level only (Rippel et al., 2020)",
    ),
    "simplenet": MethodInfo(
        "patchaudit.workers.simplenet",
        "simplenet",
        (2, 3),
        "sn",
        "adaptor + discriminator trained against Gaussian-noised patch features (Liu et al., CVPR 2023)",
    ),
}

_CLASSES: dict[str, type[AnomalyModel]] = {}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def register(name: str) -> Any:
    """Class decorator: `@register("patchcore")` makes the class the model of method `name`."""
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not in the registry's METHODS table (workers/registry.py)")

    def decorate(cls: ModelT) -> ModelT:
        cls.method = name
        _CLASSES[name] = cls
        return cls

    return decorate


def model_class(name: str) -> type[AnomalyModel]:
    """The model class of a method; its module is imported on first use."""
    info = METHODS.get(name)
    if info is None:
        raise ArtifactError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    if name not in _CLASSES:
        importlib.import_module(info.module)
        if name not in _CLASSES:  # a registry entry whose module lacks @register(name): our bug
            raise ArtifactError(f"module {info.module} does not register method {name!r}")
    return _CLASSES[name]


def method_options(config: Any, name: str | None = None) -> Any:
    """The config section of method `name` (default: `config.method`) in a ModelConfig, or None."""
    info = METHODS.get(name or config.method)
    if info is None:
        raise ConfigError(f"unknown method {name or config.method!r}; valid: {', '.join(METHODS)}")
    return getattr(config, info.section) if info.section else None
