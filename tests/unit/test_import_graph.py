"""benchmarks/import_graph.py: the package graph of this checkout has no cycle, and a cycle is found."""

from __future__ import annotations

from pathlib import Path

from bench_scripts import load_benchmark

graph = load_benchmark("import_graph.py")
REPO = Path(__file__).resolve().parents[2]


def test_this_checkout_has_no_package_or_module_cycle(capsys):
    assert graph.main(["--root", str(REPO), "--modules"]) == 0
    out = capsys.readouterr().out
    assert "package cycles: 0" in out and "module cycles: 0" in out


def test_a_cycle_through_a_function_level_import_is_found(tmp_path, capsys):
    for folder in ("workers", "scheduler", "patchaudit"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "workers" / "actors.py").write_text("def f():\n    from scheduler.streams import Queue\n")
    (tmp_path / "scheduler" / "streams.py").write_text("class Queue: ...\n")
    (tmp_path / "scheduler" / "run.py").write_text("from patchaudit.workers import actors\n")
    (tmp_path / "patchaudit" / "api.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from patchaudit.scheduler import run\n"
    )
    assert graph.main(["--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "cycle: scheduler <-> workers" in out
    assert "patchaudit.workers.actors -> patchaudit.scheduler.streams" in out
    assert "api         -> (nothing of ours)" in out  # the TYPE_CHECKING import is not an edge
