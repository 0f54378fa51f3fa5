"""Redis faults against a private redis-server: wrong or missing passwords, a service that is not
Redis, dropped connections, Redis killed mid-run.

Every failure must be one line on stderr with exit code 2 and no password in any output; a dropped
connection is survived by reconnecting (bounded backoff).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_dist import (
    REPO_ROOT,
    bottle_test_images,
    link_images,
    loopback_ray,
    new_run_id,
    wait_until,
)
from private_redis import not_redis, private_redis

pytestmark = pytest.mark.integration

SECRET = "pa-test-S3cret-9f2c"
CLI = [sys.executable, "-m", "patchaudit.scheduler.cli"]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def _assert_one_clear_line(res: subprocess.CompletedProcess[str], *words: str) -> str:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert SECRET not in out, out[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, res.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def secured() -> Iterator[Any]:
    with private_redis(password=SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def images(bottle_dir: Path, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("images")
    link_images(bottle_test_images(bottle_dir, per_type=4), bottle_dir, root)
    return f"file://{root}"


# ---------------------------------------------------------------- status (no model, no Ray)


def test_status_with_a_wrong_password_hides_it(secured) -> None:
    url = secured.url.replace(SECRET, SECRET + "-wrong")
    line = _assert_one_clear_line(_cli("status", "some-run", "--redis-url", url), "refused the credentials")
    assert ":***@127.0.0.1" in line


def test_status_of_a_missing_run_hides_the_password(secured) -> None:
    _assert_one_clear_line(_cli("status", "no-such-run", "--redis-url", secured.url), "no run")


def test_status_without_a_password_says_one_is_needed(secured) -> None:
    url = f"redis://127.0.0.1:{secured.port}/0"
    _assert_one_clear_line(_cli("status", "some-run", "--redis-url", url), "requires a password")


def test_status_of_an_unreachable_protected_redis_hides_the_password() -> None:
    from private_redis import free_port

    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    _assert_one_clear_line(_cli("status", "some-run", "--redis-url", url), "cannot reach Redis", ":***@")


def test_a_service_that_is_not_redis_is_named_as_such() -> None:
    from patchaudit.scheduler.local_redis import RedisUnavailable, ensure_redis

    with not_redis() as port:
        url = f"redis://:{SECRET}@127.0.0.1:{port}/0"
        _assert_one_clear_line(_cli("status", "some-run", "--redis-url", url), "does not speak the Redis protocol")
        # The scheduler must not start a private Redis in place of a port something else answers on.
        with pytest.raises(RedisUnavailable, match="does not speak the Redis protocol") as info:
            ensure_redis(url)
        assert SECRET not in str(info.value)


def test_a_dropped_connection_is_reconnected(secured) -> None:
    """CLIENT KILL drops every client connection (as a Redis failover or a proxy restart would)."""
    import redis

    from patchaudit.queue.connection import connect

    client = connect(secured.url)
    client.set("pa-test-key", "1")
    admin = redis.Redis.from_url(secured.url)
    assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
    assert client.get("pa-test-key") == b"1"  # reconnected transparently
    admin.delete("pa-test-key")


# ---------------------------------------------------------------- score


def test_score_with_a_wrong_password_is_one_line(secured, model_uri: str, images: str, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run:\n  redis_url: {secured.url.replace(SECRET, SECRET + '-x')}\n  batch_size: 4\n")
    res = _cli(
        "score", "--input", images, "--model", model_uri, "--report", str(tmp_path / "report"), "--config", str(cfg)
    )
    _assert_one_clear_line(res, "refused the credentials")


def test_redis_killed_mid_run_is_one_line_and_exit_2(
    bottle_dir: Path, model_uri: str, images: str, tmp_path: Path
) -> None:
    """Kill the run's Redis after the first part: the scheduler gives up after its bounded reconnect
    tries with one line (rc 2), and the parts written so far stay for a resume."""
    with loopback_ray(num_cpus=2) as ray, private_redis(password=SECRET) as server:
        report = tmp_path / "report"
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"run:\n  redis_url: {server.url}\n  batch_size: 2\n  feature_workers: 1\n  heatmaps: false\n")
        env = {
            **os.environ,
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "HF_HUB_OFFLINE": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
        log = tmp_path / "score.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [
                    *CLI,
                    "score",
                    "--input",
                    images,
                    "--model",
                    model_uri,
                    "--report",
                    str(report),
                    "--config",
                    str(cfg),
                    "--run-id",
                    new_run_id("rediskill"),
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
            )
        try:

            def first_part() -> bool:
                if proc.poll() is not None:
                    pytest.fail(f"the run ended before Redis was killed: {proc.stderr.read()[-3000:]}")
                return any((report / "parts").glob("*.parquet"))

            wait_until(first_part, 240, "the first part", every_s=0.05)
            server.kill()
            _, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        res = subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), err)
        _assert_one_clear_line(res, "cannot reach Redis", "--run-id")
        assert any((report / "parts").glob("*.parquet"))
