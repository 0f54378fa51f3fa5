"""One schema mechanism for the config file, the queue options and the queue messages.

A schema class is a frozen dataclass that derives from `Schema` and declares each field with `opt`
(a default, what the field means, and the rules its value obeys) or `need` (no default):

    @dataclass(frozen=True)
    class RunConfig(Schema):
        schema_path: ClassVar[str] = "run."
        batch_size: int = opt(32, "images per queue message (one report part each)", ge=1)

Constructing an instance coerces and checks every field against its type and rules (ints where
floats are expected become floats, lists become tuples, a dict becomes a nested section) and then
calls `check()` for rules that span fields. A bad value raises the class's `schema_error` with the
field's dotted path, what is allowed and what was given. `from_dict` builds an instance from a YAML
or JSON mapping and names unknown keys together with the allowed ones. The meanings are what
`configs/default.yaml` is generated from (`dump_defaults`), so every key is documented in one place.

Why dataclasses and not pydantic: the instances stay frozen, hashable and cheap to import (the CLI's
`--help` and the queue's message checks load no validation library); the checks are strict (`true`
is not an integer, `"16"` is not a number) and the messages name the dotted path users write in YAML.
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from patchaudit.errors import ConfigError, PatchauditError

T = TypeVar("T")
S = TypeVar("S", bound="Schema")

_RULES = ("choices", "ge", "gt", "le", "lt", "odd", "min_len", "nonempty", "pattern", "noun")


def opt(default: Any, meaning: str, **rules: Any) -> Any:
    """A field with a default. Rules: choices, ge, gt, le, lt, odd, min_len, nonempty, pattern, noun.

    Number rules (ge, gt, le, lt, odd) and string rules (choices, nonempty, pattern) apply to each
    element of a tuple; min_len to the tuple. `noun` replaces the type's name in messages
    ("seconds", "1-64 characters of [A-Za-z0-9_-]"). A section (a nested Schema class) is given as
    its class: `opt(PatchCoreConfig, "PatchCore's options")`.
    """
    unknown = set(rules) - set(_RULES)
    if unknown:
        raise TypeError(f"unknown schema rule(s) {sorted(unknown)}")
    meta = {"meaning": meaning, **rules}
    if isinstance(default, type) and issubclass(default, Schema):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def need(meaning: str, **rules: Any) -> Any:
    """A field without a default (the caller must give it)."""
    return dataclasses.field(metadata={"meaning": meaning, **rules})


# (class, prefix) while `from_dict` constructs that class, so its errors carry the caller's path
_BUILDING: contextvars.ContextVar[tuple[type, str] | None] = contextvars.ContextVar("schema_building", default=None)
_HINTS: dict[type, dict[str, Any]] = {}


class Schema:
    """Base of every schema dataclass: fields are coerced and checked when an instance is made."""

    schema_path: ClassVar[str] = ""  # prefix of field names in errors: "model.patchcore.", "queue option "
    schema_error: ClassVar[type[PatchauditError]] = ConfigError

    def __post_init__(self) -> None:
        building = _BUILDING.get()
        prefix = building[1] if building is not None and building[0] is type(self) else self.schema_path
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(self, hints[f.name], getattr(self, f.name), prefix + f.name, f.metadata)
            object.__setattr__(self, f.name, value)
        self.check(prefix)

    def check(self, prefix: str) -> None:
        """Rules that span fields (override); `prefix` starts the dotted names in messages."""

    def fail(self, message: str) -> typing.NoReturn:
        raise self.schema_error(message)

    def validate(self: S) -> S:
        """Kept for callers of the old API: an instance is valid once it exists."""
        return self


def type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Schema)


def from_dict(cls: type[T], data: Any, path: str) -> T:
    """Build schema class `cls` from a mapping; unknown keys and bad values name their dotted path."""
    error: type[PatchauditError] = getattr(cls, "schema_error", ConfigError)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise error(f"{path} must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names), key=str)  # YAML keys may be ints or bools too
    if unknown:
        listed = ", ".join(f"{path}.{key}" for key in unknown)
        raise error(f"unknown key(s) {listed}; allowed in {path}: {', '.join(names)}")
    token = _BUILDING.set((cls, f"{path}."))
    try:
        return cls(**data)
    finally:
        _BUILDING.reset(token)


# -------------------------------------------------------------------------------------- checking


def _bounds(meta: Mapping[str, Any]) -> str:
    lo = ("(", meta["gt"]) if meta.get("gt") is not None else ("[", meta["ge"]) if meta.get("ge") is not None else None
    hi = (")", meta["lt"]) if meta.get("lt") is not None else ("]", meta["le"]) if meta.get("le") is not None else None
    if lo and hi:
        return f" in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f" {'>' if lo[0] == '(' else '>='} {lo[1]:g}"
    if hi:
        return f" {'<' if hi[0] == ')' else '<='} {hi[1]:g}"
    return ""


def _in_bounds(value: float, meta: Mapping[str, Any]) -> bool:
    return not (
        (meta.get("ge") is not None and value < meta["ge"])
        or (meta.get("gt") is not None and value <= meta["gt"])
        or (meta.get("le") is not None and value > meta["le"])
        or (meta.get("lt") is not None and value >= meta["lt"])
    )


def _coerce(owner: Schema, tp: Any, value: Any, path: str, meta: Mapping[str, Any], nullable: bool = False) -> Any:
    """`value` as type `tp` obeying `meta`'s rules, or `owner.fail` with what is allowed."""
    alt = " or null" if nullable else ""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:
            return _coerce(owner, real[0], value, path, meta, nullable=type(None) in args)
        for arg in real:
            try:
                return _coerce(owner, arg, value, path, meta)
            except owner.schema_error:
                pass
        owner.fail(f"{path}: {value!r} matches none of the allowed types")
    if is_section(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            owner.fail(f"{path} must be a list{alt}, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if len(value) < meta.get("min_len", 0):
                owner.fail(
                    f"{path} must not be empty"
                    if meta["min_len"] == 1
                    else f"{path} must hold at least {meta['min_len']} values, got {list(value)}"
                )
            return tuple(_coerce(owner, args[0], v, f"{path}[{i}]", meta) for i, v in enumerate(value))
        if len(value) != len(args):
            owner.fail(f"{path} must be a list of {len(args)} values{alt}, got {list(value)}")
        return tuple(_coerce(owner, a, v, f"{path}[{i}]", meta) for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            owner.fail(f"{path} must be true or false{alt}, got {value!r}")
        return value
    if tp is int or tp is float:
        noun = meta.get("noun") or ("an odd integer" if meta.get("odd") else "an integer" if tp is int else "a number")
        ok_types = (int,) if tp is int else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, ok_types)
            or not _in_bounds(value, meta)
            or (meta.get("odd") and value % 2 == 0)
        ):
            owner.fail(f"{path} must be {noun}{_bounds(meta)}{alt}, got {value!r}")
        return float(value) if tp is float else value
    if tp is str:
        choices = meta.get("choices")
        if choices is not None:
            if value not in choices:
                owner.fail(f"{path}: {value!r} is not valid; choose one of: {', '.join(choices)}")
            return value
        pattern = meta.get("pattern")
        noun = meta.get("noun") or ("a non-empty string" if meta.get("nonempty") else "a string")
        if (
            not isinstance(value, str)
            or (meta.get("nonempty") and not value.strip())
            or (pattern is not None and not re.fullmatch(pattern, value))
        ):
            owner.fail(f"{path} must be {noun}{alt}, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported schema type {tp!r}")  # a bug in a schema class, not user input


# -------------------------------------------------------------------------------------- documentation


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text  # YAML 1.1 needs the dot
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    if (
        isinstance(value, str)
        and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:/-]*", value)
        and value
        not in (
            "null",
            "true",
            "false",
            "yes",
            "no",
            "on",
            "off",
            "y",
            "n",
        )
    ):
        return value
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _describe(meta: Mapping[str, Any]) -> str:
    text = str(meta.get("meaning", "")).strip()
    if meta.get("choices"):
        text += f"; one of: {' | '.join(meta['choices'])}"
    return text


def dump_defaults(cls: type[Schema], header: str = "", width: int = 100) -> str:
    """YAML of every field of `cls` at its default, each preceded by its meaning as a comment."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    if lines:
        lines.append("")

    def walk(section: type[Schema], indent: str) -> None:
        instance = section()
        hints = type_hints(section)
        for f in dataclasses.fields(section):  # type: ignore[arg-type]
            wrap = textwrap.wrap(_describe(f.metadata), width - len(indent) - 2) or [""]
            lines.extend(f"{indent}# {w}" for w in wrap)
            if is_section(hints[f.name]):
                lines.append(f"{indent}{f.name}:")
                walk(hints[f.name], indent + "  ")
            else:
                lines.append(f"{indent}{f.name}: {_yaml_scalar(getattr(instance, f.name))}")

    walk(cls, "")
    return "\n".join(lines) + "\n"
