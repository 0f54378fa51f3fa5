"""`patchaudit score` against a Ray cluster started the way the VM guide starts one: `ray start --head`
and a second node with `ray start --address`, both on loopback (127.0.0.1 and 127.0.0.2), with
Ray's token authentication on (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), reached with RAY_ADDRESS.

- A driver without the token is refused with one line naming RAY_AUTH_MODE=token (exit 2).
- With the token, the run's actors run on the cluster's nodes and every image is scored once.
- `run.decode: cluster` with custom resources: the decode actors on the head, the feature worker on the
  second node; the decoded batches cross between the nodes' object stores, every image is scored once.
The cluster comes from ray_nodes.py, which stops only the processes it started; `ray stop` is never called.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_dist import (
    REPO_ROOT,
    assert_exactly_once,
    bottle_test_images,
    link_images,
    new_run_id,
    redis_url,  # noqa: F401 (fixture)
    report_rows,
    run_ids,  # noqa: F401 (fixture)
)
from ray_nodes import Cluster, NodeSpec, ray_nodes

pytestmark = pytest.mark.integration

HEAD, NODE2 = "127.0.0.1", "127.0.0.2"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # The head offers CPUs for decoding ("decode"), the second node a place for a feature worker ("features").
    with ray_nodes([NodeSpec(HEAD, 2, {"decode": 2}), NodeSpec(NODE2, 1, {"features": 1})]) as c:
        yield c


@pytest.fixture(scope="module")
def images(bottle_dir: Path, tmp_path_factory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("images")
    keys = link_images(bottle_test_images(bottle_dir, per_type=2), bottle_dir, root)
    return f"file://{root}", keys


def _score(
    env: dict[str, str], images: str, model: str, report: Path, cfg: Path, run_id: str, workers: int = 2
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "patchaudit.scheduler.cli",
        "score",
        "--input",
        images,
        "--model",
        model,
        "--report",
        str(report),
        "--config",
        str(cfg),
        "--run-id",
        run_id,
        "--workers",
        str(workers),
    ]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _new_run(name: str, run_ids: list[str], tmp_path: Path, redis_url: str, extra: str = "") -> tuple[str, Path]:
    """A new run id (cleaned up by `run_ids`) and its run.yaml: messages of 4, no heatmaps, plus `extra`."""
    run_id = new_run_id(name)
    run_ids.append(run_id)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run:\n  redis_url: {redis_url}\n  batch_size: 4\n  heatmaps: false\n{extra}")
    return run_id, cfg


def test_a_driver_without_the_token_is_told_what_to_set(
    cluster,
    model_uri,
    images,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
) -> None:  # noqa: F811
    run_id, cfg = _new_run("noauth", run_ids, tmp_path, redis_url)
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["RAY_ADDRESS"] = cluster.address
    res = _score(env, images[0], model_uri, tmp_path / "report", cfg, run_id)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("patchaudit score: error:")]
    assert len(ours) == 1, res.stderr[-3000:]  # (Ray's own C++ warnings may precede it)
    line = ours[0]
    assert "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line and cluster.address in line, line
    assert cluster.token not in res.stdout + res.stderr


def test_score_on_a_two_node_cluster_with_the_token(
    cluster,
    model_uri,
    images,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
) -> None:  # noqa: F811
    run_id, cfg = _new_run("cluster", run_ids, tmp_path, redis_url)
    report = tmp_path / "report"
    res = _score({**cluster.env, "RAY_ADDRESS": cluster.address}, images[0], model_uri, report, cfg, run_id)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = report_rows(str(report))
    assert_exactly_once(rows, [f"{images[0]}/{k}" for k in images[1]])
    assert [r["error"] for r in rows if r["error"]] == []
    summary = json.loads((report / "summary.json").read_text())
    used = {w["node"] for w in summary["workers"]} | {s["node"] for s in summary["shards"] if "node" in s}
    assert used and used <= set(cluster.nodes), (used, cluster.nodes)  # the cluster's nodes, not a local Ray


def test_decode_on_one_node_features_on_the_other(
    cluster,
    model_uri,
    images,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
) -> None:  # noqa: F811
    extra = "  decode: cluster\n  decode_resource: decode\n  worker_resource: features\n"
    run_id, cfg = _new_run("cluster-decode", run_ids, tmp_path, redis_url, extra)
    report = tmp_path / "report"
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    res = _score(env, images[0], model_uri, report, cfg, run_id, workers=1)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = report_rows(str(report))
    assert_exactly_once(rows, [f"{images[0]}/{k}" for k in images[1]])
    assert [r["error"] for r in rows if r["error"]] == []
    [worker] = json.loads((report / "summary.json").read_text())["workers"]
    node2 = cluster.node_of_ip[NODE2]
    [head] = [n for n in cluster.nodes if n != node2]  # (the head may report the host's address, not HEAD)
    assert worker["node"] == node2
    decode = worker["decode"]
    assert decode["nodes"] == [head]  # both decode actors on the head
    assert decode["requests"] == len(images[1]) // 4 and decode["local_decodes"] == 0
    assert decode["peak_in_flight"] <= 2
