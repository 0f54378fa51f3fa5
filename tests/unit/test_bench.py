"""`patchaudit bench`: grid expansion, resume, summary/Pareto wiring and the self-contained report.

The per-config runner is replaced by a fake that writes what a worker writes (result fields and a
heatmap PNG), so no model is fitted here; the real worker's small helpers are tested directly.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from patchaudit.bench import runner as bench
from patchaudit.bench.runner import BenchError, BenchOptions, config_id, expand_grid, parse_list, run_bench
from patchaudit.bench.worker import downsample_curve, pick_examples
from patchaudit.errors import ConfigError
from patchaudit.workers.config import ModelConfig

DATA = "file:///data/bottle"
METHODS = ["patchcore", "padim", "gaussian"]


def small_grid():
    return expand_grid(ModelConfig(), METHODS, ["tf_efficientnet_lite0", "mobilenetv2_100"], [224], [0.1])


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class FakeRunner:
    """Stands in for the worker subprocess: returns plausible results, counts calls."""

    def __init__(
        self, fail: set[str] = frozenset(), interrupt_at: int | None = None, selection: dict[str, float] | None = None
    ) -> None:
        self.calls: list[str] = []
        self.fail = fail
        self.interrupt_at = interrupt_at
        self.selection = selection or {}  # label -> image AUROC on the selection part (default: = full)

    def __call__(self, cfg, data_uri, cdir: Path, options):
        self.calls.append(cfg.config_id)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt  # the machine dies mid-configuration
        if cfg.config_id in self.fail:
            raise BenchError(f"{cfg.label}: worker exited with status 1")
        (cdir / "heatmaps").mkdir(exist_ok=True)
        (cdir / "heatmaps" / "top_0.png").write_bytes(_png())
        m = cfg.model
        maps = m.method != "gaussian"
        speed = {"patchcore": 5.0, "padim": 8.0, "gaussian": 20.0}[m.method] * (1.5 if "mobilenet" in m.backbone else 1)
        img = {"patchcore": 0.99, "padim": 0.97, "gaussian": 0.95}[m.method]
        sel_img = self.selection.get(cfg.label, img)

        def part(image_auroc: float) -> dict:
            return {
                "image_auroc": image_auroc,
                "pixel_auroc": 0.97 if maps else None,
                "aupro": 0.9 if maps else None,
                "f1": 0.9,
                "n_images": 5,
            }

        return {
            "parts": {"selection": part(sel_img), "report": part(img - 0.02)},
            "image_auroc": img,
            "pixel_auroc": 0.97 if maps else None,
            "aupro": 0.9 if maps else None,
            "f1": 0.9,
            "precision": 0.9,
            "recall": 0.9,
            "threshold": 1.0,
            "n_test": 10,
            "per_defect": {"crack": {"count": 5, "image_auroc": img, "pixel_auroc": None, "aupro": None}},
            "fit_s": 3.0,
            "fit_cpu_s": 2.0,
            "images_per_s": speed,
            "images_per_cpu_s": speed / 2,
            "model_mb": {"patchcore": 9.0, "padim": 120.0, "gaussian": 2.0}[m.method],
            "peak_rss_mb": 900.0,
            "peak_fit_rss_mb": 800.0,
            "roc": {"fpr": [0.0, 0.1, 1.0], "tpr": [0.0, 0.9, 1.0]},
            "heatmaps": [
                {
                    "kind": "top",
                    "file": "heatmaps/top_0.png",
                    "key": "test/crack/000.png",
                    "label": 1,
                    "defect_type": "crack",
                    "score": 2.0,
                    "is_anomalous": True,
                }
            ],
        }


# --------------------------------------------------------------------------- grid


def test_grid_expansion_counts_layers_and_coreset_only_for_patchcore():
    grid = expand_grid(ModelConfig(), METHODS, ["tf_efficientnet_lite0", "mobilenetv2_100"], [224, 256], [0.01, 0.1])
    by_method = {m: [c for c in grid if c.model.method == m] for m in METHODS}
    assert [len(by_method[m]) for m in METHODS] == [8, 4, 4]  # 2 backbones x 2 sizes (x 2 coresets)
    assert {c.model.layers for c in by_method["patchcore"]} == {(2, 3)}
    assert {c.model.layers for c in by_method["padim"]} == {(1, 2, 3)}
    assert {c.model.layers for c in by_method["gaussian"]} == {(0, 1, 2, 3, 4)}
    assert {c.model.patchcore.coreset_ratio for c in by_method["patchcore"]} == {0.01, 0.1}
    assert {c.model.image_size for c in grid} == {(224, 224), (256, 256)}
    assert all(c.model.center_crop is None for c in grid)
    assert len({c.config_id for c in grid}) == len(grid)
    assert "patchcore/mobilenetv2_100/224/c0.01" in {c.label for c in grid}


def test_config_id_is_stable_and_sensitive():
    a = [c.config_id for c in small_grid()]
    assert a == [c.config_id for c in small_grid()]
    assert all(re.fullmatch(r"[0-9a-f]{12}", x) for x in a)
    base = ModelConfig()
    assert config_id(base) == config_id(ModelConfig())
    assert config_id(base) != config_id(ModelConfig(seed=1))


def test_grid_base_config_carries_through_and_crop_is_refused():
    from patchaudit.workers.config import CalibrationConfig

    base = ModelConfig(calibration=CalibrationConfig(folds=3))
    assert all(c.model.calibration.folds == 3 for c in expand_grid(base, ["padim"], ["x"], [64], [0.1]))
    with pytest.raises(ConfigError, match="center crop"):
        expand_grid(ModelConfig(center_crop=(224, 224)), ["padim"], ["x"], [256], [0.1])


@pytest.mark.parametrize(
    "args, match",
    [
        ((["knn"], ["b"], [256], [0.1]), "'knn' is not valid; choose from patchcore, padim, gaussian"),
        ((["padim"], ["b"], [16], [0.1]), ">= 32"),
        ((["padim"], ["b"], [256], [1.5]), r"not in \(0, 1\]"),
    ],
)
def test_grid_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        expand_grid(ModelConfig(), *args)


def test_parse_list():
    assert parse_list("224, 256,224", "sizes", int) == [224, 256]
    with pytest.raises(ConfigError, match="--sizes: 'big' is not a valid int"):
        parse_list("224,big", "sizes", int)
    with pytest.raises(ConfigError, match="at least one value"):
        parse_list(" , ", "methods")


# --------------------------------------------------------------------------- resume


def test_resume_skips_finished_configurations(tmp_path):
    grid = small_grid()
    first = FakeRunner()
    run_bench(DATA, tmp_path, grid, runner=first, log=lambda m: None)
    assert sorted(first.calls) == sorted(c.config_id for c in grid)
    for c in grid:
        assert json.loads((tmp_path / "configs" / c.config_id / "result.json").read_text())["status"] == "ok"

    second = FakeRunner()
    logs: list[str] = []
    summary = run_bench(DATA, tmp_path, grid, runner=second, log=logs.append)
    assert second.calls == []
    assert sum(m.endswith("done before, skipped") for m in logs) == len(grid)
    assert len(summary["rows"]) == len(grid)

    # a grown grid runs only the new configurations
    bigger = expand_grid(ModelConfig(), METHODS, ["tf_efficientnet_lite0", "mobilenetv2_100"], [224, 256], [0.1])
    third = FakeRunner()
    run_bench(DATA, tmp_path, bigger, runner=third, log=lambda m: None)
    assert sorted(third.calls) == sorted(c.config_id for c in bigger if c.model.image_size == (256, 256))


def test_crash_loses_at_most_the_running_configuration(tmp_path):
    grid = small_grid()
    crashing = FakeRunner(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_bench(DATA, tmp_path, grid, runner=crashing, log=lambda m: None)
    done = [c.config_id for c in grid if (tmp_path / "configs" / c.config_id / "result.json").is_file()]
    assert done == [c.config_id for c in grid[:2]]  # persisted as each one finished
    again = FakeRunner()
    run_bench(DATA, tmp_path, grid, runner=again, log=lambda m: None)
    assert again.calls == [c.config_id for c in grid[2:]]


def test_a_configuration_locked_by_a_live_process_is_left_to_it(tmp_path):
    grid = small_grid()
    busy, stale = grid[0].config_id, grid[1].config_id
    for cid, pid in ((busy, 1), (stale, 2**22 + 12345)):  # pid 1 is alive; the other is beyond pid_max
        (tmp_path / "configs" / cid).mkdir(parents=True)
        (tmp_path / "configs" / cid / "lock").write_text(str(pid))
    runner = FakeRunner()
    logs: list[str] = []
    summary = run_bench(DATA, tmp_path, grid, runner=runner, log=logs.append)
    assert busy not in runner.calls and stale in runner.calls and len(runner.calls) == len(grid) - 1
    assert any("running in another bench process" in m for m in logs)
    assert busy not in {r["config_id"] for r in summary["rows"]}  # not finished: not in this summary
    assert (tmp_path / "configs" / busy / "lock").read_text() == "1"  # not ours to remove
    assert not (tmp_path / "configs" / stale / "lock").exists()  # ours, released when done


def test_failed_configurations_are_recorded_and_retried(tmp_path):
    grid = small_grid()
    bad = grid[1].config_id
    summary = run_bench(DATA, tmp_path, grid, runner=FakeRunner(fail={bad}), log=lambda m: None)
    row = next(r for r in summary["rows"] if r["config_id"] == bad)
    assert row["status"] == "failed" and "status 1" in row["error"]
    assert not row["pareto"] and not row["pareto_image"]
    again = FakeRunner()
    run_bench(DATA, tmp_path, grid, runner=again, log=lambda m: None)
    assert again.calls == [bad]


def test_other_data_in_the_same_folder_is_refused(tmp_path):
    run_bench(DATA, tmp_path, small_grid()[:1], runner=FakeRunner(), log=lambda m: None)
    with pytest.raises(BenchError, match="holds a bench of file:///data/bottle"):
        run_bench("file:///data/screw", tmp_path, small_grid()[:1], runner=FakeRunner(), log=lambda m: None)


# --------------------------------------------------------------------------- summary and outputs


def test_summary_accuracy_pareto_and_recommendations(tmp_path):
    summary = run_bench(DATA, tmp_path, small_grid(), runner=FakeRunner(), log=lambda m: None)
    rows = {r["label"]: r for r in summary["rows"]}
    g = rows["gaussian/mobilenetv2_100/224"]
    assert g["accuracy"] is None and g["pixel_auroc"] is None  # n/a, never 0
    assert not g["pareto"] and g["pareto_image"]  # fastest and smallest on the image-level front
    pc = rows["patchcore/tf_efficientnet_lite0/224/c0.1"]
    assert pc["accuracy"] == pytest.approx((0.99 + 0.9) / 2)
    # mobilenet is faster at equal accuracy and size, so lite0 is dominated
    assert rows["patchcore/mobilenetv2_100/224/c0.1"]["pareto"] and not pc["pareto"]
    # pixel front: patchcore/mnv2 (acc .945) and padim/mnv2 (.935, faster); tolerance .01 -> padim/mnv2
    assert summary["recommended"]["label"] == "padim/mobilenetv2_100/224"
    assert summary["recommended_image"]["label"] in {r["label"] for r in summary["rows"] if r["pareto_image"]}
    assert sum(r["recommended"] for r in summary["rows"]) == 1

    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert len(table) == len(summary["rows"]) and "pareto" in table[0]
    assert {r["defect_type"] for r in pq.read_table(tmp_path / "per_defect.parquet").to_pylist()} == {"crack"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["recommended"] == summary["recommended"]
    assert "model:" in (tmp_path / "recommended.yaml").read_text()
    md = bench.markdown_table(summary["rows"])
    assert md.count("\n") == len(summary["rows"]) + 1 and "n/a" in md and "R-pix" in md


def test_speed_option_changes_the_speed_axis(tmp_path):
    summary = run_bench(
        DATA, tmp_path, small_grid(), BenchOptions(speed="cpu"), runner=FakeRunner(), log=lambda m: None
    )
    assert summary["speed_metric"] == "images_per_cpu_s"
    with pytest.raises(ConfigError, match="choose one of: wall, cpu"):
        BenchOptions(speed="gpu").validate()


def test_report_is_one_self_contained_file(tmp_path):
    grid = small_grid()
    run_bench(DATA, tmp_path, grid, runner=FakeRunner(), log=lambda m: None)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text and "<link" not in text and "@import" not in text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert text.count("<svg") >= 2 + 3  # two scatters, one ROC panel per method
    assert "n/a" in text  # Gaussian AD pixel metrics
    for c in grid:
        assert c.label in text


def test_report_renders_without_heatmaps_or_results(tmp_path):
    from patchaudit.bench.report import render_report

    summary = bench.summarize([], DATA, BenchOptions())
    html = render_report(summary, tmp_path)
    assert "0 of 0 configurations" in html and "No Pareto-optimal configuration" in html


# --------------------------------------------------------------------------- worker helpers, CLI


def test_pick_examples():
    labels = [0, 1, 0, 1, 1, 0]
    scores = [0.1, 0.9, 0.8, 0.2, 0.5, 0.3]
    got = pick_examples(labels, scores, 2)
    assert got == {"top": [1, 2], "false_positive": [2, 5], "missed": [3, 4]}


def test_downsample_curve_keeps_ends():
    x = [i / 999 for i in range(1000)]
    dx, dy = downsample_curve(x, x, 50)
    assert len(dx) == 50 and dx[0] == 0.0 and dx[-1] == 1.0 and dx == sorted(dx)
    assert downsample_curve([0, 1], [0, 1], 50) == ([0, 1], [0, 1])


def test_cli_bench_wiring(monkeypatch, tmp_path, capsys):
    from patchaudit.scheduler import cli

    seen = {}

    def fake_run_bench(data, out, grid, options):
        seen.update(data=data, out=out, grid=grid, options=options)
        return bench.summarize([], data, options)

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    assert cli.main(["bench", "--data", str(tmp_path)]) == 2  # checked before any configuration runs
    assert "no training images" in capsys.readouterr().err and not seen
    for key in ("train/good/a.png", "test/good/b.png", "test/crack/c.png"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(_png())
    rc = cli.main(
        [
            "bench",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--methods",
            "padim,gaussian",
            "--backbones",
            "mobilenetv2_100",
            "--sizes",
            "224,256",
            "--speed",
            "cpu",
        ]
    )
    assert rc == 0
    assert len(seen["grid"]) == 4 and seen["options"].speed == "cpu" and seen["out"] == str(tmp_path / "o")
    assert "| config |" in capsys.readouterr().out
    assert cli.main(["bench", "--data", str(tmp_path), "--methods", "svm"]) == 2
    assert "'svm' is not valid" in capsys.readouterr().err


def test_bench_modules_do_not_import_torch():
    code = (
        "import sys, patchaudit.scheduler.cli, patchaudit.bench.runner, patchaudit.bench.report, "
        "patchaudit.bench.worker, patchaudit.bench.pareto; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_crowded_labels_stay_inside_the_plot():
    # A point at the right edge whose free spots are all taken: the label may overlap, but not leave the frame.
    from patchaudit.bench.report import place_labels

    frame = (0.0, 0.0, 200.0, 100.0)
    blocker = [(0.0, 0.0, 200.0, 100.0)]  # every spot overlaps something
    (svg,) = place_labels([(195.0, 50.0, 4.0, "padim/mobilenetv2_100/256")], frame, obstacles=blocker)
    x = float(re.search(r'x="([\d.]+)"', svg).group(1))
    assert 'text-anchor="end"' in svg and x <= 195.0


# --------------------------------------------------------------------------- nested selection


def test_split_parts_is_stratified_seeded_and_order_free():
    from patchaudit.bench.selection import REPORT, SELECTION, split_parts

    keys = [
        f"test/{t}/{i:03d}.png" for t, n in (("good", 20), ("crack", 7), ("hole", 2), ("rare", 1)) for i in range(n)
    ]
    strata = [k.split("/")[1] for k in keys]
    parts = split_parts(keys, strata, 0.5, seed=0)
    by = {(s, p): 0 for s in set(strata) for p in (SELECTION, REPORT)}
    for s, p in zip(strata, parts):
        by[s, p] += 1
    assert by["good", SELECTION] == 10 and by["crack", SELECTION] in (3, 4)
    assert by["hole", SELECTION] == 1 and by["hole", REPORT] == 1  # a stratum of two is split
    assert by["rare", SELECTION] + by["rare", REPORT] == 1
    # the same cut whatever the listing order; another seed gives another cut
    rev = split_parts(keys[::-1], strata[::-1], 0.5, seed=0)[::-1]
    assert rev == parts
    assert split_parts(keys, strata, 0.5, seed=1) != parts
    assert split_parts(keys, strata, 0.0, seed=0) == [REPORT] * len(keys)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        split_parts(keys, strata, 1.0, seed=0)


def test_nested_selection_ranks_on_the_selection_part_and_shows_the_report_part(tmp_path):
    # On the full split PaDiM/mobilenet is recommended (see above); on the selection part PatchCore/mobilenet
    # is far ahead, so the nested bench recommends it and shows its report-part numbers.
    label = "patchcore/mobilenetv2_100/224/c0.1"
    runner = FakeRunner(selection={label: 0.999, "padim/mobilenetv2_100/224": 0.90})
    summary = run_bench(DATA, tmp_path, small_grid(), runner=runner, log=lambda m: None)
    rec = summary["recommended"]
    assert rec["label"] == label and rec["metric"] == "accuracy"
    row = {r["label"]: r for r in summary["rows"]}[label]
    assert rec["report"] == pytest.approx(row["rep_accuracy"]) == pytest.approx((0.99 - 0.02 + 0.9) / 2)
    assert rec["selection"] == pytest.approx((0.999 + 0.9) / 2)
    assert rec["optimistic_full"] == pytest.approx((0.99 + 0.9) / 2)  # best full-split accuracy of any config
    assert rec["optimism"] == pytest.approx(rec["optimistic_full"] - rec["report"])
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Report part" in html and "selection part" in html and "took no part in choosing" in html
    md = bench.markdown_table(summary["rows"])
    assert "report accuracy" in md


def test_every_section_of_a_nested_report_names_the_part_its_numbers_come_from(tmp_path):
    runner = FakeRunner(selection={"patchcore/mobilenetv2_100/224/c0.1": 0.999})
    summary = run_bench(DATA, tmp_path, small_grid(), runner=runner, log=lambda m: None)
    assert "accuracy on the selection part" in summary["recommended"]["reason"]
    assert "image AUROC on the selection part" in summary["recommended_image"]["reason"]
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "sel_accuracy" not in html and "sel_image_auroc" not in html  # internal keys never reach the reader
    text = re.sub(r"<[^>]+>", " ", html)
    assert "ROC curves (image level, full test split)" in text
    assert "image-level ROC, full test split" in html and "(full split)" in html  # each plot and curve
    assert "Full test split (both parts). Each cell" in text  # per defect type
    assert "Examples are picked from the full test split" in text  # heatmaps
    assert "Metric columns up to recall: the full test split" in text
    assert "(0.010 above the report-part number)" in text
    # a report part that came out above the full split reads as "below", never as "-0.002 above"
    from patchaudit.bench.report import render_report

    summary["recommended"]["optimism"] = -0.002
    text = re.sub(r"<[^>]+>", " ", render_report(summary, tmp_path))
    assert "(0.002 below the report-part number)" in text and "-0.002" not in text


def test_without_nested_selection_the_numbers_are_labelled_optimistic(tmp_path):
    summary = run_bench(
        DATA,
        tmp_path,
        small_grid(),
        BenchOptions(selection_fraction=0.0),
        runner=FakeRunner(selection={"padim/mobilenetv2_100/224": 0.5}),
        log=lambda m: None,
    )
    assert summary["recommended"]["label"] == "padim/mobilenetv2_100/224"  # the selection part is ignored
    assert "report" not in summary["recommended"] and "optimistic" in summary["selection"]["ranked_on"]
    assert "also used to choose: optimistic" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_a_folder_keeps_its_selection_cut(tmp_path):
    run_bench(DATA, tmp_path, small_grid()[:1], runner=FakeRunner(), log=lambda m: None)
    with pytest.raises(BenchError, match="--selection-fraction 0.5 --split-seed 0"):
        run_bench(DATA, tmp_path, small_grid()[:1], BenchOptions(split_seed=3), runner=FakeRunner(), log=lambda m: None)
