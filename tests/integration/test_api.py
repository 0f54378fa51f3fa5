"""The documented Python API example runs as written (the package docstring's, and the README's when it has one)
on a small MVTec-style copy of the bottle category."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest

import patchaudit

REPO = Path(__file__).resolve().parents[2]


def docstring_example() -> str:
    doc = patchaudit.__doc__ or ""
    block = re.search(r"\n\n(    import patchaudit\n.*?)\n\n", doc, re.S)
    assert block, "the package docstring lost its example"
    return textwrap.dedent(block.group(1))


def readme_example() -> str | None:
    """The ```python block of the README's "Python API" section, if the README has one."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Python API\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not section:
        return None
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    return block.group(1) if block else None


@pytest.fixture(scope="module")
def workdir(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/bottle with 12 training images and 3 good + 3 defective test images (with masks)."""
    root = tmp_path_factory.mktemp("api")
    dst = root / "data" / "bottle"
    picks = {
        "train/good": sorted((bottle_dir / "train/good").glob("*.png"))[:12],
        "test/good": sorted((bottle_dir / "test/good").glob("*.png"))[:3],
        "test/broken_large": sorted((bottle_dir / "test/broken_large").glob("*.png"))[:3],
    }
    for rel, files in picks.items():
        (dst / rel).mkdir(parents=True)
        for f in files:
            shutil.copy(f, dst / rel / f.name)
    (dst / "ground_truth/broken_large").mkdir(parents=True)
    for f in picks["test/broken_large"]:
        shutil.copy(bottle_dir / "ground_truth/broken_large" / f"{f.stem}_mask.png", dst / "ground_truth/broken_large")
    return root


def examples() -> dict[str, str]:
    """The distinct examples: the README's is run too when it differs from the docstring's."""
    found = {"docstring": docstring_example()}
    readme = readme_example()
    if readme is not None and readme.strip() != found["docstring"].strip():
        found["readme"] = readme
    return found


EXAMPLES = examples()


@pytest.mark.data
@pytest.mark.parametrize("source", sorted(EXAMPLES))
def test_documented_example_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch, source: str, capsys) -> None:
    code = EXAMPLES[source]
    run = workdir / source
    run.mkdir()
    (run / "data").symlink_to(workdir / "data")
    monkeypatch.chdir(run)
    exec(compile(code, f"<{source} example>", "exec"), {})
    model_id, auroc, anomalous, rows, threshold = capsys.readouterr().out.split()
    assert model_id.startswith("patchcore-") and 0.0 <= float(auroc) <= 1.0
    assert int(rows) == 6 and 0 <= int(anomalous) <= 6 and float(threshold) > 0
