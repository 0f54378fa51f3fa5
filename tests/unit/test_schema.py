"""The schema mechanism itself, and configs/default.yaml: generated from the schema, so it lists every key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from patchaudit.errors import ConfigError
from patchaudit.scheduler.config import Config, RunConfig, config_from_dict, defaults_yaml
from patchaudit.schema import Schema, dump_defaults, from_dict, need, opt

DEFAULT_YAML = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def test_default_yaml_is_the_generated_text():
    # A new or changed field, default or meaning must be followed by `make configs`.
    assert DEFAULT_YAML.read_text() == defaults_yaml(), "configs/default.yaml is stale: run `make configs`"


def test_default_yaml_loads_to_the_defaults_and_names_every_key():
    data = yaml.safe_load(DEFAULT_YAML.read_text())
    assert config_from_dict(data) == Config()

    def keys(cls, d, path):
        for f in dataclasses.fields(cls):
            assert f.name in d, f"{path}{f.name} missing from configs/default.yaml"
            assert f.metadata.get("meaning"), f"{path}{f.name} has no meaning"
            if dataclasses.is_dataclass(f.type) or isinstance(d[f.name], dict):
                keys(type(getattr(cls(), f.name)), d[f.name], f"{path}{f.name}.")

    keys(Config, data, "")
    for name in ("reweight_neighbors", "hnsw_ef_search", "ivf_nprobe"):
        assert name in data["model"]["patchcore"]
    assert {"padim", "gaussian"} <= set(data["model"]) and "redis_url" in data["run"]


def test_cli_prints_the_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "patchaudit.scheduler.config", "--defaults"], capture_output=True, text=True, check=True
    ).stdout
    assert out == defaults_yaml()


@dataclasses.dataclass(frozen=True)
class Inner(Schema):
    schema_path: ClassVar[str] = "outer.inner."
    ratio: float = opt(0.5, "a share", gt=0, le=1)


@dataclasses.dataclass(frozen=True)
class Outer(Schema):
    schema_path: ClassVar[str] = "outer."
    name: str = need("required, no default", nonempty=True)
    size: int | None = opt(None, "optional count", ge=1)
    kind: str = opt("a", "one of two", choices=("a", "b"))
    sizes: tuple[int, ...] = opt((1, 2), "some sizes", min_len=1, ge=0)
    inner: Inner = opt(Inner, "a section")

    def check(self, prefix: str) -> None:
        if self.size is not None and self.size > 10 and self.kind == "a":
            self.fail(f"{prefix}size must be <= 10 with kind a")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "outer.name must be a non-empty string, got ''"),
        ({"name": "x", "size": 0}, "outer.size must be an integer >= 1 or null, got 0"),
        ({"name": "x", "size": 2.0}, "outer.size must be an integer >= 1 or null, got 2.0"),
        ({"name": "x", "kind": "c"}, "outer.kind: 'c' is not valid; choose one of: a, b"),
        ({"name": "x", "sizes": []}, "outer.sizes must not be empty"),
        ({"name": "x", "sizes": [1, -1]}, "outer.sizes[1] must be an integer >= 0, got -1"),
        ({"name": "x", "inner": {"ratio": 0}}, "outer.inner.ratio must be a number in (0, 1], got 0"),
        ({"name": "x", "inner": [1]}, "outer.inner must be a mapping, got list"),
        ({"name": "x", "size": 11}, "outer.size must be <= 10 with kind a"),
    ],
)
def test_rules_and_messages(kwargs, message):
    with pytest.raises(ConfigError) as info:
        Outer(**kwargs)
    assert str(info.value) == message


def test_coercion_and_paths_given_by_from_dict():
    o = from_dict(Outer, {"name": "x", "sizes": [3], "inner": {"ratio": 1}}, "top")
    assert o.sizes == (3,) and o.inner == Inner(ratio=1.0) and isinstance(o.inner.ratio, float)
    hash(o)
    with pytest.raises(ConfigError, match=r"^top\.size must be an integer >= 1 or null"):
        from_dict(Outer, {"name": "x", "size": -1}, "top")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) top\.bogus; allowed in top: name, size"):
        from_dict(Outer, {"name": "x", "bogus": 1}, "top")


def test_dump_defaults_of_a_section():
    text = dump_defaults(Inner)
    assert text == "# a share\nratio: 0.5\n"
    assert RunConfig().knn_backend in dump_defaults(RunConfig)
