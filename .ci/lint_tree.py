"""Lay the package out as it is installed, as links under build/lint/patchaudit, for mypy and import-linter.

pyproject.toml maps the design's top-level folders (workers/, scheduler/, store/) into the `patchaudit`
namespace; both tools read packages from the file system, so they need one folder per package name.
Usage: python .ci/lint_tree.py [DEST]   (default build/lint; run from anywhere)
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "lint"
    pkg = dest / "patchaudit"
    if pkg.is_symlink() or pkg.is_file():
        pkg.unlink()
    elif pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in sorted((ROOT / "patchaudit").iterdir()):
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in mapping.items():
        parts = name.split(".")
        if parts[0] != "patchaudit" or len(parts) != 2:
            raise SystemExit(f"lint_tree: cannot lay out package-dir entry {name!r}")
        (pkg / parts[1]).symlink_to(ROOT / folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
