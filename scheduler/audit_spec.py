"""The audit spec: which product lines a nightly audit scores, from where, with which model, into where.

One YAML document, validated at load like the config file (unknown keys are errors that name the
allowed ones; every message names the spec file and the dotted path of the bad value):

    report_root: s3://reports/audit   # optional default for lines without their own
    config: {run: {batch_size: 32}}   # optional overrides for every line (same shape as a config file),
                                      # or the path of a config file (relative to the spec's folder)
    drift: {flag_rate_bound: 0.05}    # optional; see DriftSpec
    lines:
      - name: bottle
        input: s3://archive/bottle/{date:%Y/%m/%d}/   # must contain one {date} field
        model: s3://models/bottle/v3
        report_root: s3://reports/bottle              # optional when the top level has one
        config: {run: {heatmaps: true}}               # optional, merged over the top-level overrides

This module does not import torch, Ray or boto3.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import string
from dataclasses import dataclass, field
from typing import Any

from patchaudit.errors import ConfigError
from patchaudit.scheduler.config import Config, config_from_dict

LINE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_TOP_KEYS = ("lines", "report_root", "config", "drift")
_LINE_KEYS = ("name", "input", "model", "report_root", "config", "flag_rate_bound")
_DRIFT_KEYS = ("flag_rate_bound", "min_images")


@dataclass(frozen=True)
class DriftSpec:
    flag_rate_bound: float = 0.05  # warn when |flag rate - previous flag rate| exceeds this (absolute)
    min_images: int = 20  # no warning when either run scored fewer images (too few to compare)


@dataclass(frozen=True)
class LineSpec:
    name: str
    input: str  # template with one {date[:strftime format]} field
    model: str
    report_root: str
    config: Config
    drift: DriftSpec = field(default_factory=DriftSpec)

    def input_for(self, date: dt.date) -> str:
        """The input prefix of `date` (the template formatted with it)."""
        return self.input.format(date=date)


@dataclass(frozen=True)
class AuditSpec:
    path: str
    lines: tuple[LineSpec, ...]

    def select(self, names: str | None) -> tuple[LineSpec, ...]:
        """The lines named in a comma-separated list (all when None); unknown names are errors."""
        if names is None:
            return self.lines
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        if not wanted:
            raise ConfigError("--lines is empty; name at least one line")
        known = {line.name: line for line in self.lines}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ConfigError(
                f"unknown line(s) {', '.join(unknown)} in --lines; lines in {self.path}: {', '.join(known)}"
            )
        return tuple(known[n] for n in dict.fromkeys(wanted))


def check_template(template: Any, where: str) -> str:
    """`template` if it is a prefix template with exactly one {date} field, else ConfigError."""
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {template!r}")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(
            f"{where}: {template!r} is not a valid template ({exc}); write literal braces as {{{{ and }}}}"
        ) from None
    names = [name for name, _, _ in fields]
    if "date" not in names:
        raise ConfigError(
            f"{where}: {template!r} has no {{date}} field; each night needs its own prefix, "
            "e.g. s3://archive/line-7/{date:%Y/%m/%d}/"
        )
    others = sorted({n for n in names if n != "date"})
    if others:
        raise ConfigError(f"{where}: {template!r} has field(s) {others}; the only field allowed is {{date}}")
    for _name, _spec, conv in fields:
        if conv:
            raise ConfigError(f"{where}: {{date!{conv}}} is not allowed; use {{date:FORMAT}} with a strftime format")
    sample = dt.date(2026, 1, 2)
    try:
        a, b = template.format(date=sample), template.format(date=sample + dt.timedelta(days=1))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {template!r} cannot be formatted with a date ({exc})") from None
    if a == b:
        raise ConfigError(f"{where}: {template!r} gives the same prefix for two days; its date format needs the day")
    return template


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _keys(data: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(str(k) for k in set(data) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; allowed in {where}: {', '.join(allowed)}"
        )
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of config mappings: `over` wins, sections merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _drift(data: Any, base: DriftSpec, where: str) -> DriftSpec:
    data = _keys(data or {}, _DRIFT_KEYS, where)
    bound = data.get("flag_rate_bound", base.flag_rate_bound)
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0.0 < bound <= 1.0:
        raise ConfigError(f"{where}.flag_rate_bound must be a number in (0, 1], got {bound!r}")
    min_images = data.get("min_images", base.min_images)
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 0:
        raise ConfigError(f"{where}.min_images must be an integer >= 0, got {min_images!r}")
    return DriftSpec(float(bound), min_images)


def _config_file(name: str, spec_path: str) -> dict[str, Any]:
    import yaml

    full = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(spec_path)), name)
    if not os.path.isfile(full):
        raise ConfigError(f"config: file {name!r} not found (looked at {full})")
    with open(full, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {full} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {full} must hold a mapping (model/run)")
    return data


def spec_from_dict(data: Any, path: str = "spec") -> AuditSpec:
    """Validate a parsed spec document; ConfigError names `path` and the bad key."""
    try:
        return _spec_from_dict(data, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _spec_from_dict(data: Any, path: str) -> AuditSpec:
    if data is None:
        raise ConfigError("the spec is empty; it needs a 'lines' list")
    top = _keys(data, _TOP_KEYS, "spec")
    base_config = top.get("config") or {}
    if isinstance(base_config, str):  # a config file, relative to the spec's folder
        base_config = _config_file(base_config, path)
    if not isinstance(base_config, dict):
        raise ConfigError(f"config must be a mapping like a config file (model/run), got {base_config!r}")
    config_from_dict(base_config, "config")  # the shared overrides are valid on their own
    drift = _drift(top.get("drift"), DriftSpec(), "drift")
    default_root = top.get("report_root")
    if default_root is not None:
        _str(default_root, "report_root")
    raw_lines = top.get("lines")
    if not isinstance(raw_lines, list) or not raw_lines:
        raise ConfigError("'lines' must be a non-empty list of product lines (name, input, model, report_root)")
    lines: list[LineSpec] = []
    roots: dict[str, str] = {}
    for i, raw in enumerate(raw_lines):
        where = f"lines[{i}]"
        item = _keys(raw, _LINE_KEYS, where)
        for req in ("name", "input", "model"):
            if req not in item:
                raise ConfigError(
                    f"{where} has no '{req}' (required: name, input, model; report_root unless the top level has one)"
                )
        name = _str(item["name"], f"{where}.name")
        if not LINE_NAME_RE.match(name):
            raise ConfigError(
                f"{where}.name {name!r} is not valid: 1-63 characters from A-Z a-z 0-9 _ -, "
                "starting with a letter or digit"
            )
        if any(line.name == name for line in lines):
            raise ConfigError(f"{where}.name {name!r} is used by an earlier line; names must be unique")
        where = f"lines[{i}] ({name})"
        template = check_template(item["input"], f"{where}.input")
        model = _str(item["model"], f"{where}.model")
        root = item.get("report_root", default_root)
        if root is None:
            raise ConfigError(f"{where} has no report_root and the spec has no top-level report_root")
        root = _str(root, f"{where}.report_root")
        key = root.rstrip("/")
        if key in roots:  # one ledger per line: two lines in one root would read each other's passes
            raise ConfigError(f"{where}.report_root {root!r} is also line {roots[key]!r}'s; give each line its own")
        roots[key] = name
        over = item.get("config") or {}
        if not isinstance(over, dict):
            raise ConfigError(f"{where}.config must be a mapping like a config file (model/run), got {over!r}")
        config = config_from_dict(_merge(base_config, over), f"{where}.config")
        line_drift = drift
        if "flag_rate_bound" in item:
            line_drift = _drift({"flag_rate_bound": item["flag_rate_bound"]}, drift, where)
        lines.append(LineSpec(name, template, model, root, config, line_drift))
    return AuditSpec(path, tuple(lines))


def load_spec(path: str) -> AuditSpec:
    """Load and validate an audit spec YAML file."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"audit spec not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()
            raise ConfigError(f"{path} is not valid YAML: {' '.join(s.strip() for s in first)}") from None
    return spec_from_dict(data, path)


def parse_date(text: str, option: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{option} {text!r} is not a date; use YYYY-MM-DD") from None


def audit_dates(date: str | None, since: str | None, today: dt.date | None = None) -> list[dt.date]:
    """The nights to audit: --date D, or every day from --since D up to yesterday; default yesterday (UTC)."""
    today = today or dt.datetime.now(dt.UTC).date()
    yesterday = today - dt.timedelta(days=1)
    if date is not None and since is not None:
        raise ConfigError("give --date or --since, not both")
    if date is not None:
        return [parse_date(date, "--date")]
    if since is not None:
        start = parse_date(since, "--since")
        if start > yesterday:
            raise ConfigError(f"--since {since} is after yesterday ({yesterday}); use --date for a single day")
        return [start + dt.timedelta(days=n) for n in range((yesterday - start).days + 1)]
    return [yesterday]
