"""A Ray cluster started the way the VM guide starts one: `ray start --head` on 127.0.0.1 and more nodes
with `ray start --address` on 127.0.0.2, ..., with Ray's token authentication on (RAY_AUTH_MODE=token,
RAY_AUTH_TOKEN), each node with its own CPUs and custom resources. A driver reaches it with RAY_ADDRESS.

Used by test_ray_cluster.py and test_cluster_decode_nodes.py (`from ray_nodes import ...`). Only the
processes started here are stopped (their process groups, then any process left that names the
cluster's private temp dir); `ray stop` is never called.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).parent / "ray")
START_TIMEOUT_S = 120


@dataclass(frozen=True)
class NodeSpec:
    ip: str  # a loopback address: 127.0.0.1 (the head), 127.0.0.2, ...
    num_cpus: int = 1
    resources: dict[str, float] = field(default_factory=dict)  # custom resources this node offers


@dataclass
class Cluster:
    address: str
    token: str
    temp_dir: str
    env: dict[str, str]  # what a node (and an authorised driver) has
    nodes: list[str]  # live node ids
    node_of_ip: dict[str, str]  # node id by the address the node reports (the head may report the host's)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_pids(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (the cluster's private temp dir): ours alone."""
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


def live_nodes(cluster_env: dict[str, str], address: str) -> dict[str, str]:
    """{node address: node id} of the cluster's live nodes (empty while it is not up)."""
    code = (
        f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(json.dumps({n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes() if n['Alive']}))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=cluster_env, capture_output=True, text=True, timeout=120)
    out = res.stdout.strip().splitlines()
    return json.loads(out[-1]) if res.returncode == 0 and out else {}


@contextlib.contextmanager
def ray_nodes(specs: Sequence[NodeSpec]) -> Iterator[Cluster]:
    """Start the head (specs[0]) and the other nodes; yield once all have joined; stop them all."""
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
    port = free_port()
    address = f"127.0.0.1:{port}"
    logs = Path(temp_dir) / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for n, spec in enumerate(specs):
            node_args = [f"--node-ip-address={spec.ip}", f"--num-cpus={spec.num_cpus}", "--disable-usage-stats"]
            if spec.resources:
                node_args.append(f"--resources={json.dumps(spec.resources)}")
            if n == 0:
                node_args += [
                    "--head",
                    f"--port={port}",
                    f"--temp-dir={temp_dir}",
                    "--include-dashboard=false",
                    f"--ray-client-server-port={free_port()}",
                ]
            else:
                node_args.append(f"--address={address}")
            log = logs / f"node{n}.log"
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [RAY, "start", "--block", *node_args],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            while len(live_nodes(env, address)) < n + 1:
                if procs[n].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray node {n} ({spec.ip}) did not start or join:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        by_ip = live_nodes(env, address)
        yield Cluster(address, token, temp_dir, env, list(by_ip.values()), by_ip)
    finally:
        _stop(procs, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
