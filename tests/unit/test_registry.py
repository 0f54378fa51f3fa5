"""The method registry: one table of methods, classes registered by their own modules, loaded on demand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from patchaudit.errors import ArtifactError, ConfigError
from patchaudit.workers import registry
from patchaudit.workers.config import METHODS as CONFIG_METHODS
from patchaudit.workers.config import ModelConfig, model_config_from_dict


def test_every_method_resolves_to_its_registered_class():
    for name, info in registry.METHODS.items():
        cls = registry.model_class(name)
        assert cls.method == name
        assert cls.__module__ == info.module


def test_config_accepts_exactly_the_registered_methods():
    assert CONFIG_METHODS == tuple(registry.METHODS)
    for name in registry.METHODS:
        assert model_config_from_dict({"method": name}).method == name
    with pytest.raises(ConfigError, match="choose one of: patchcore, padim, gaussian"):
        model_config_from_dict({"method": "knn"})


def test_unknown_method_is_a_clear_artifact_error():
    with pytest.raises(ArtifactError, match="unknown method 'knn'; valid: patchcore, padim, gaussian"):
        registry.model_class("knn")


def test_register_refuses_a_name_outside_the_table():
    with pytest.raises(ConfigError, match="not in the registry"):
        registry.register("knn")


def test_method_options_is_the_methods_config_section():
    cfg = ModelConfig()
    assert registry.method_options(cfg) is cfg.patchcore
    assert registry.method_options(cfg, "padim") is cfg.padim
    assert registry.method_options(model_config_from_dict({"method": "gaussian"})).eps == cfg.gaussian.eps
    for info in registry.METHODS.values():
        assert info.section is None or hasattr(cfg, info.section)


def test_importing_the_registry_and_config_loads_no_method_code():
    code = (
        "import sys; import patchaudit.workers.registry, patchaudit.workers.config; "
        "print(sorted(m for m in ('torch', 'faiss', 'patchaudit.workers.patchcore', "
        "'patchaudit.workers.model') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
