"""Fault injection: break a distributed run the ways an operator would, and count what the report holds.

    python benchmarks/faults.py [--data ../shared/data/mvtec_ad/bottle] [--images 60] [--batch-size 4]
                                [--only NAME ...] [--out runs/faults/results.json]

Everything runs against a private `redis-server` (free loopback port, a password, no persistence)
that this script starts and stops, and one local Ray on loopback that the `patchaudit score`
processes join through RAY_ADDRESS. A small PatchCore model (128x128, 40 bottle train images) is
fitted first. Each scenario scores `--images` bottle test images (batch size 4) into its own report
with its own run id, injects its fault, then recovers the way the operator would (the same command
again, the password fixed, the good model, ...). After the last step it reads the report:

    scenario | exit codes (fault -> recovery) | rows | duplicates | missing | seconds (last step) | total s

`missing` counts listed images without a row, `duplicates` images with more than one. Every row must
show 0 and 0. The SIGINT/SIGTERM/SIGKILL resumes are compared with the clean run (the issue's bar:
within 2x). No output of any step may contain the Redis password (`leaks`). Wall seconds on a shared
machine measure who got the cores; the scheduler's own CPU seconds are reported beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = os.path.join("..", "shared", "data", "mvtec_ad", "bottle")
PASSWORD = "faults-" + os.urandom(6).hex()
CLI = [sys.executable, "-m", "patchaudit.scheduler.cli"]


# --------------------------------------------------------------------------- services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of our own: started, killed and restarted by pid, never the shared one."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                PASSWORD,
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        import redis

        for _ in range(200):
            try:
                if redis.Redis.from_url(self.url, socket_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)


# --------------------------------------------------------------------------- one step, one scenario


@dataclass
class Step:
    rc: int
    seconds: float
    cpu_s: float
    output: str


@dataclass
class Scenario:
    name: str
    steps: list[Step] = field(default_factory=list)
    report: Path | None = None
    note: str = ""


def run_cli(
    args: list[str],
    env: dict[str, str],
    during: Callable[[subprocess.Popen, Path], None] | None = None,
    log: Path | None = None,
    timeout: float = 900,
) -> Step:
    """Run `patchaudit ARGS`; `during(proc, log)` may inject a fault while it runs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    log = log or Path(tempfile.mktemp(suffix=".log"))
    with open(log, "wb") as out:
        proc = subprocess.Popen([*CLI, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            if during is not None:
                during(proc, log)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Step(proc.returncode, time.perf_counter() - t0, cpu, log.read_text(errors="replace"))


def parts(report: Path) -> int:
    return len(list((report / "parts").glob("*.parquet")))


def when_parts(n: int, action: Callable[[subprocess.Popen], None]) -> Callable[[subprocess.Popen, Path], None]:
    """Inject `action` once the report holds `n` parts (or give up if the run ends first)."""

    def during(proc: subprocess.Popen, log: Path) -> None:
        report = Path(_current_report[0])
        while proc.poll() is None:
            if parts(report) >= n:
                action(proc)
                return
            time.sleep(0.05)

    return during


_current_report: list[str] = [""]


def count(report: Path, listed: list[str]) -> dict[str, int]:
    import pyarrow.parquet as pq

    uris: list[str] = []
    for p in sorted((report / "parts").glob("*.parquet")):
        uris += pq.read_table(p, columns=["image_uri"])["image_uri"].to_pylist()
    seen: dict[str, int] = {}
    for u in uris:
        seen[u] = seen.get(u, 0) + 1
    return {
        "rows": len(uris),
        "duplicates": sum(1 for n in seen.values() if n > 1),
        "missing": sum(1 for u in listed if u not in seen),
    }


# --------------------------------------------------------------------------- set-up


def link_tree(files: list[Path], root: Path, dst: Path) -> None:
    for f in files:
        target = dst / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)


def prepare(data: Path, work: Path, n_images: int, env: dict[str, str]) -> tuple[str, str, list[str]]:
    """Fit the model; link `n_images` test images (spread over the test folders). Returns (model, input, uris)."""
    train = sorted((data / "train" / "good").glob("*.png"))[:40]
    link_tree(train, data, work / "train_data")
    cfg = work / "fit.yaml"
    cfg.write_text("model:\n  image_size: [128, 128]\n")
    model = work / "model"
    res = subprocess.run(
        [*CLI, "fit", "--data", str(work / "train_data"), "--config", str(cfg), "--out", str(model)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if res.returncode != 0:
        raise SystemExit(f"fit failed:\n{res.stderr[-3000:]}")
    tests = sorted(p for p in (data / "test").rglob("*.png"))
    step = max(1, len(tests) // n_images)
    chosen = tests[::step][:n_images]
    link_tree(chosen, data, work / "input")
    from patchaudit.store.objects import open_store

    src = open_store(str(work / "input"))
    uris = [i.uri for i in src.list()]
    return src.uri, open_store(str(model)).uri, uris


# --------------------------------------------------------------------------- scenarios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="run only these scenarios (names as in the table)")
    ap.add_argument("--out", default=os.path.join("runs", "faults", "results.json"))
    args = ap.parse_args()

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    work = Path(tempfile.mkdtemp(prefix="patchaudit-faults-"))
    server = PrivateRedis(work)
    server.start()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "HF_HUB_OFFLINE": "1"}
    results: list[Scenario] = []
    try:
        input_uri, model_uri, uris = prepare(Path(args.data), work, args.images, env)
        cfg = work / "run.yaml"
        cfg.write_text(
            f"run:\n  redis_url: {server.url}\n  batch_size: {args.batch_size}\n  heatmaps: false\n"
            "  feature_workers: 2\n"
        )

        def score(
            report: Path,
            run_id: str,
            config: Path = cfg,
            model: str = model_uri,
            during: Callable | None = None,
            extra: tuple[str, ...] = (),
        ) -> Step:
            _current_report[0] = str(report)
            return run_cli(
                [
                    "score",
                    "--input",
                    input_uri,
                    "--model",
                    model,
                    "--report",
                    str(report),
                    "--config",
                    str(config),
                    "--run-id",
                    run_id,
                    *extra,
                ],
                env,
                during,
            )

        def scenario(name: str, body: Callable[[Scenario, Path, str], None]) -> None:
            if args.only and name not in args.only:
                return
            sc = Scenario(name)
            report = work / "reports" / name.replace(" ", "_")
            sc.report = report
            t0 = time.perf_counter()
            print(f"--- {name}", file=sys.stderr, flush=True)
            body(sc, report, "f-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:40] + "-" + os.urandom(3).hex())
            sc.note = sc.note or ""
            sc.total = time.perf_counter() - t0  # type: ignore[attr-defined]
            results.append(sc)
            last = sc.steps[-1]
            print(
                f"    rc {[s.rc for s in sc.steps]} in {sc.total:.1f}s; tail: {last.output.strip()[-300:]}",
                file=sys.stderr,
                flush=True,
            )

        def signal_at_3(sig: int) -> Callable:
            return when_parts(3, lambda p: p.send_signal(sig))

        def clean(sc: Scenario, report: Path, run_id: str) -> None:
            sc.steps.append(score(report, run_id))

        def interrupted(sig: int) -> Callable:
            def body(sc: Scenario, report: Path, run_id: str) -> None:
                sc.steps.append(score(report, run_id, during=signal_at_3(sig)))
                sc.steps.append(score(report, run_id))

            return body

        def dropped_connections(sc: Scenario, report: Path, run_id: str) -> None:
            def drop(_: subprocess.Popen) -> None:
                server.client().client_kill_filter(_type="normal", skipme=True)

            sc.steps.append(score(report, run_id, during=when_parts(3, drop)))

        def redis_killed(sc: Scenario, report: Path, run_id: str) -> None:
            sc.steps.append(score(report, run_id, during=when_parts(3, lambda p: server.kill())))
            server.start()  # back, empty: the report's parts say what is done
            sc.steps.append(score(report, run_id))

        def redis_flushed(sc: Scenario, report: Path, run_id: str) -> None:
            sc.steps.append(score(report, run_id, during=when_parts(3, lambda p: server.client().flushall())))
            sc.steps.append(score(report, run_id))

        def wrong_password(sc: Scenario, report: Path, run_id: str) -> None:
            bad = work / "bad_password.yaml"
            bad.write_text(cfg.read_text().replace(PASSWORD, PASSWORD + "-wrong"))
            sc.steps.append(score(report, run_id, config=bad))
            sc.steps.append(score(report, run_id))

        def not_redis(sc: Scenario, report: Path, run_id: str) -> None:
            http = subprocess.Popen(
                [sys.executable, "-m", "http.server", str(port := free_port()), "--bind", "127.0.0.1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(1)
                bad = work / "not_redis.yaml"
                bad.write_text(cfg.read_text().replace(f":{server.port}/", f":{port}/"))
                sc.steps.append(score(report, run_id, config=bad))
            finally:
                http.terminate()
                http.wait()
            sc.steps.append(score(report, run_id))

        def tampered_model(sc: Scenario, report: Path, run_id: str) -> None:
            bad = work / "model_tampered"
            shutil.copytree(model_uri.removeprefix("file://"), bad, dirs_exist_ok=True)
            manifest = json.loads((bad / "manifest.json").read_text())
            victim = bad / sorted(manifest["files"])[0]
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0xFF
            victim.write_bytes(bytes(data))
            sc.steps.append(score(report, run_id, model=f"file://{bad}"))
            sc.steps.append(score(report, run_id))

        def slow_batches(sc: Scenario, report: Path, run_id: str) -> None:
            slow = work / "slow.yaml"
            slow.write_text(cfg.read_text() + "  reclaim_idle_s: 0.5\n")
            sc.steps.append(score(report, run_id, config=slow))
            import pyarrow.parquet as pq

            attempts = {
                a
                for p in (report / "parts").glob("*.parquet")
                for a in pq.read_table(p, columns=["attempt"])["attempt"].to_pylist()
            }
            sc.note = f"attempts {sorted(attempts)} (reclaim_idle_s 0.5 s, batches take longer)"

        def single_into_distributed(sc: Scenario, report: Path, run_id: str) -> None:
            sc.steps.append(score(report, run_id))
            sc.steps.append(
                run_cli(
                    ["score", "--single-process", "--input", input_uri, "--model", model_uri, "--report", str(report)],
                    env,
                )
            )

        scenario("clean", clean)
        scenario("SIGINT + resume", interrupted(signal.SIGINT))
        scenario("SIGTERM + resume", interrupted(signal.SIGTERM))
        scenario("SIGKILL + resume", interrupted(signal.SIGKILL))
        scenario("Redis connections dropped", dropped_connections)
        scenario("Redis killed + restarted + resume", redis_killed)
        scenario("Redis FLUSHALL + resume", redis_flushed)
        scenario("wrong Redis password, then right", wrong_password)
        scenario("non-Redis service on the port, then Redis", not_redis)
        scenario("tampered model, then good model", tampered_model)
        scenario("slow batches (heartbeat)", slow_batches)
        scenario("single-process into a distributed report", single_into_distributed)
    finally:
        ray.shutdown()
        server.kill()

    rows = []
    clean_s = next((s.steps[-1].seconds for s in results if s.name == "clean"), None)
    for sc in results:
        c = count(sc.report, uris) if sc.report else {}
        leaks = sum(PASSWORD in s.output for s in sc.steps)
        tracebacks = sum("Traceback" in s.output for s in sc.steps)
        rows.append(
            {
                "scenario": sc.name,
                "exit_codes": " -> ".join(str(s.rc) for s in sc.steps),
                **c,
                "seconds": round(sc.steps[-1].seconds, 1),
                "total_s": round(sc.total, 1),  # type: ignore[attr-defined]
                "scheduler_cpu_s": round(sum(s.cpu_s for s in sc.steps), 1),
                "vs_clean": round(sc.steps[-1].seconds / clean_s, 2) if clean_s else None,
                "password_leaks": leaks,
                "tracebacks": tracebacks,
                "note": sc.note,
            }
        )
    header = "| scenario | exit codes | rows | duplicates | missing | seconds (last step) | x clean | total s | scheduler CPU s |"
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{args.images} bottle test images, batch size {args.batch_size}, 2 feature workers"
    )
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        print(
            f"| {r['scenario']} | {r['exit_codes']} | {r.get('rows')} | {r.get('duplicates')} | {r.get('missing')} | "
            f"{r['seconds']} | {r['vs_clean']} | {r['total_s']} | {r['scheduler_cpu_s']} |"
        )
    for r in rows:
        if r["note"]:
            print(f"{r['scenario']}: {r['note']}")
    print(f"password leaks: {sum(r['password_leaks'] for r in rows)}; tracebacks: {sum(r['tracebacks'] for r in rows)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": platform.processor(),
                "cores": os.cpu_count(),
                "images": args.images,
                "batch_size": args.batch_size,
                "rows": rows,
            },
            indent=2,
        )
    )
    shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in rows if r.get("missing") or r.get("duplicates") or r["password_leaks"] or r["tracebacks"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
