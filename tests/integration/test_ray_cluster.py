"""`patchaudit score` against a Ray cluster started the way the VM guide starts one: `ray start --head`
and a second node with `ray start --address`, both on loopback (127.0.0.1 and 127.0.0.2), with
Ray's token authentication on (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), reached with RAY_ADDRESS.

- A driver without the token is refused with one line naming RAY_AUTH_MODE=token (exit 2).
- With the token, the run's actors run on the cluster's nodes and every image is scored once.
Only the processes this module starts are stopped (their process groups, then any process left in
the cluster's private temp dir); `ray stop` is never called.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_dist import (
    REPO_ROOT,
    assert_exactly_once,
    bottle_test_images,
    fit_small,
    link_images,
    new_run_id,
    redis_url,  # noqa: F401 (fixture)
    report_rows,
    run_ids,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    token: str
    temp_dir: str
    env: dict[str, str]  # what a node (and an authorised driver) has
    nodes: list[str]  # node ids: the head (127.0.0.1) and the second node (127.0.0.2)


def _own_pids(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (this module's private temp dir): ours alone."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return [p for p in out if p != os.getpid()]


def _stop(procs: list[subprocess.Popen], marker: str) -> None:
    for p in procs:  # `ray start --block` stops its node's processes when it gets SIGTERM
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (any(p.poll() is None for p in procs) or _own_pids(marker)):
        time.sleep(0.5)
    for pid in _own_pids(marker):  # whatever outlived that: ours (it names our temp dir)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def _nodes(cluster_env: dict[str, str], address: str) -> list[str]:
    """Ids of the cluster's live nodes (empty while it is not up)."""
    code = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(','.join(n['NodeID'] for n in ray.nodes() if n['Alive']))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=cluster_env, capture_output=True, text=True, timeout=120)
    out = res.stdout.strip().splitlines()
    return [n for n in out[-1].split(",") if n] if res.returncode == 0 and out else []


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not os.path.exists(RAY):
        pytest.skip("no `ray` command next to this Python")
    temp_dir = tempfile.mkdtemp(prefix="pa-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    home = Path(temp_dir) / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what the other tests set for a loopback-only local Ray)
    # forbids joining a second node; the nodes here advertise loopback addresses explicitly instead.
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    port = _free_port()
    address = f"127.0.0.1:{port}"
    logs = Path(temp_dir) / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        with open(logs / "head.log", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        RAY,
                        "start",
                        "--head",
                        "--block",
                        f"--port={port}",
                        "--node-ip-address=127.0.0.1",
                        f"--temp-dir={temp_dir}",
                        "--include-dashboard=false",
                        "--num-cpus=1",
                        f"--ray-client-server-port={_free_port()}",
                        "--disable-usage-stats",
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(_nodes(env, address)) < 1:
            if procs[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not start:\n{(logs / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        with open(logs / "node2.log", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        RAY,
                        "start",
                        "--block",
                        f"--address={address}",
                        "--node-ip-address=127.0.0.2",
                        "--num-cpus=1",
                        "--disable-usage-stats",
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        while len(nodes := _nodes(env, address)) < 2:
            if procs[1].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"second ray node did not join:\n{(logs / 'node2.log').read_text()[-3000:]}")
            time.sleep(1)
        yield Cluster(address, token, temp_dir, env, nodes)
    finally:
        _stop(procs, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def model_uri(bottle_dir: Path, tmp_path_factory) -> str:
    return fit_small(bottle_dir, tmp_path_factory.mktemp("model128"), n_train=24, image_size=(128, 128))


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


def test_a_driver_without_the_token_is_told_what_to_set(
    cluster,
    model_uri,
    images,
    redis_url,  # noqa: F811
    run_ids,
    tmp_path: Path,
) -> None:  # noqa: F811
    run_id = new_run_id("noauth")
    run_ids.append(run_id)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run:\n  redis_url: {redis_url}\n  batch_size: 4\n  heatmaps: false\n")
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
    run_id = new_run_id("cluster")
    run_ids.append(run_id)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run:\n  redis_url: {redis_url}\n  batch_size: 4\n  heatmaps: false\n")
    report = tmp_path / "report"
    res = _score({**cluster.env, "RAY_ADDRESS": cluster.address}, images[0], model_uri, report, cfg, run_id)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = report_rows(str(report))
    assert_exactly_once(rows, [f"{images[0]}/{k}" for k in images[1]])
    assert [r["error"] for r in rows if r["error"]] == []
    summary = json.loads((report / "summary.json").read_text())
    used = {w["node"] for w in summary["workers"]} | {s["node"] for s in summary["shards"] if "node" in s}
    assert used and used <= set(cluster.nodes), (used, cluster.nodes)  # the cluster's nodes, not a local Ray
