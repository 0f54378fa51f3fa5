"""The audit spec: validation messages, date selection, and the CLI's bad-input contract (exit 2, one line,
nothing written)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from patchaudit.errors import ConfigError
from patchaudit.scheduler.audit_spec import (
    audit_dates,
    check_template,
    load_spec,
    spec_from_dict,
)
from patchaudit.scheduler.cli import main

REPO = Path(__file__).resolve().parents[2]


def _line(**over):
    line = {"name": "bottle", "input": "s3://a/bottle/{date:%Y/%m/%d}/", "model": "s3://a/m", "report_root": "s3://a/r"}
    line.update(over)
    return line


def test_example_spec_loads():
    spec = load_spec(str(REPO / "configs" / "audit.example.yaml"))
    assert [line.name for line in spec.lines] == ["bottle", "magnetic-tile"]
    tile = spec.lines[1]
    assert tile.config.run.batch_size == 64 and tile.config.run.heatmaps is True  # line over shared overrides
    assert spec.lines[0].config.run.batch_size == 32
    assert tile.drift.flag_rate_bound == 0.10 and spec.lines[0].drift.flag_rate_bound == 0.05
    assert tile.input_for(dt.date(2026, 12, 1)) == "s3://inspection-data/images/magnetic-tile/2026-12-01/"
    assert spec.lines[0].input_for(dt.date(2026, 12, 1)).endswith("/bottle/2026/12/01/")


@pytest.mark.parametrize(
    "template, message",
    [
        ("s3://a/line-7/", "has no {date} field"),
        ("s3://a/{day}/", "has no {date} field"),
        ("s3://a/{date}/{line}/", "the only field allowed is {date}"),
        ("s3://a/{date:%Y}/", "same prefix for two days"),
        ("s3://a/{date!r}/", "not allowed"),
        ("s3://a/{date/", "not a valid template"),
        ("", "non-empty string"),
    ],
)
def test_bad_templates(template, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        check_template(template, "lines[0].input")


def test_plain_date_field_is_iso():
    assert check_template("/x/{date}", "t").format(date=dt.date(2026, 1, 2)) == "/x/2026-01-02"


@pytest.mark.parametrize(
    "doc, message",
    [
        (None, "empty"),
        ([], "must be a mapping"),
        ({"lines": []}, "non-empty list"),
        ({"lines": [_line()], "extra": 1}, "unknown key"),
        ({"lines": [_line(colour="red")]}, r"lines\[0\].colour"),
        ({"lines": [_line(name="a b")]}, "is not valid"),
        ({"lines": [_line(), _line(report_root="s3://a/other")]}, "used by an earlier line"),
        ({"lines": [_line(), _line(name="tile")]}, "also line 'bottle'"),
        ({"lines": [{k: v for k, v in _line().items() if k != "model"}]}, "has no 'model'"),
        ({"lines": [{k: v for k, v in _line().items() if k != "report_root"}]}, "no report_root"),
        ({"lines": [_line(config={"run": {"batch_size": 0}})]}, "run.batch_size must be an integer >= 1"),
        ({"lines": [_line(config={"run": {"bogus": 1}})]}, "run.bogus"),
        ({"lines": [_line(flag_rate_bound=2)]}, "flag_rate_bound"),
        ({"lines": [_line()], "drift": {"min_images": -1}}, "min_images"),
    ],
)
def test_bad_specs(doc, message):
    with pytest.raises(ConfigError, match=message) as info:
        spec_from_dict(doc, "my.yaml")
    assert str(info.value).startswith("my.yaml: ")


def test_select_lines():
    spec = spec_from_dict({"lines": [_line(), _line(name="tile", report_root="s3://a/t")]}, "s.yaml")
    assert [line.name for line in spec.select("tile,bottle,tile")] == ["tile", "bottle"]
    assert len(spec.select(None)) == 2
    with pytest.raises(ConfigError, match="unknown line.*nope.*lines in s.yaml: bottle, tile"):
        spec.select("bottle,nope")


def test_audit_dates():
    today = dt.date(2026, 12, 3)
    assert audit_dates(None, None, today) == [dt.date(2026, 12, 2)]
    assert audit_dates("2026-11-30", None, today) == [dt.date(2026, 11, 30)]
    assert audit_dates(None, "2026-11-30", today) == [dt.date(2026, 11, 30), dt.date(2026, 12, 1), dt.date(2026, 12, 2)]
    with pytest.raises(ConfigError, match="not a date"):
        audit_dates("2026-13-01", None, today)
    with pytest.raises(ConfigError, match="after yesterday"):
        audit_dates(None, "2026-12-03", today)


def _spec_file(tmp_path: Path, text: str) -> str:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return str(p)


GOOD = """
lines:
  - name: bottle
    input: {root}/in/{{date:%Y-%m-%d}}
    model: {root}/no-model-here
    report_root: {root}/reports
"""


@pytest.mark.parametrize(
    "case", ["unknown line", "malformed yaml", "no date", "unknown key", "bad date", "missing model", "missing spec"]
)
def test_cli_bad_input_exit_2_one_line_nothing_written(case, tmp_path, capsys):
    root = tmp_path / "work"
    root.mkdir()
    text = GOOD.format(root=root)
    args = ["--date", "2026-11-01"]
    if case == "unknown line":
        args += ["--lines", "tile"]
    elif case == "malformed yaml":
        text = "lines: [\n  - name: bottle\n  input: {"
    elif case == "no date":
        text = text.replace("{date:%Y-%m-%d}", "today")
    elif case == "unknown key":
        text += "    colour: red\n"
    elif case == "bad date":
        args = ["--date", "yesterday"]
    spec = _spec_file(tmp_path, text) if case != "missing spec" else str(tmp_path / "nope.yaml")
    before = sorted(p.name for p in root.rglob("*"))
    rc = main(["audit", "--spec", spec, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("patchaudit audit: error: "), err
    assert sorted(p.name for p in root.rglob("*")) == before  # nothing written


def test_config_may_be_a_file_next_to_the_spec(tmp_path):
    (tmp_path / "run.yaml").write_text("run:\n  batch_size: 7\n")
    spec_path = _spec_file(tmp_path, "config: run.yaml\n" + GOOD.format(root=tmp_path))
    assert load_spec(spec_path).lines[0].config.run.batch_size == 7
    (tmp_path / "run.yaml").write_text("run:\n  batch_sise: 7\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_spec(spec_path)
    with pytest.raises(ConfigError, match="not found"):
        load_spec(_spec_file(tmp_path, "config: nope.yaml\n" + GOOD.format(root=tmp_path)))
