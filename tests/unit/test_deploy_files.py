"""deploy/ parses and keeps the properties the deployment guide relies on (no cluster, no network)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.gpu"]
YAML_FILES = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))
POD_OWNERS = ("Deployment", "CronJob", "RayCluster")


def _docs(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _objects() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in _objects() if o["kind"] == kind]


def _names(kind: str) -> set[str]:
    return {o["metadata"]["name"] for o in _of_kind(kind)}


def _raycluster() -> dict[str, Any]:
    (rc,) = _of_kind("RayCluster")
    return rc


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs an object's pod templates hold (one per group for a RayCluster)."""
    spec = obj["spec"]
    if obj["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    if obj["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if obj["kind"] == "RayCluster":
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        return [g["template"]["spec"] for g in groups]
    raise AssertionError(f"no pod template known for kind {obj['kind']}")


def _all_pod_specs() -> list[dict[str, Any]]:
    return [p for kind in POD_OWNERS for o in _of_kind(kind) for p in _pod_specs(o)]


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _final_stage_user(text: str) -> str | None:
    """The USER the final stage runs as (None: no USER there, i.e. root)."""
    instructions = _dockerfile_instructions(text)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    users = [args for word, args in instructions[last_from:] if word == "USER"]
    return users[-1].split(":")[0] if users else None


def _arg_default(text: str, name: str) -> str | None:
    m = re.search(rf"^ARG {name}=(\S+)$", text, re.MULTILINE)
    return m.group(1).strip("\"'") if m else None


# ---- every YAML file ------------------------------------------------------------------------------


def test_deploy_holds_the_expected_yaml_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    expected = {
        "k8s/raycluster.yaml",
        "k8s/redis.yaml",
        "k8s/cronjob-nightly.yaml",
        "k8s/configmap.yaml",
        "k8s/secret.example.yaml",
    }
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_file_parses_into_kubernetes_objects(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path.name} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is a {type(doc).__name__}, not a mapping"
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{path.name}: a document has no {key!r}"
        assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} has no metadata.name"


@pytest.mark.parametrize(
    ("filename", "kinds"),
    [
        ("raycluster.yaml", {"RayCluster"}),
        ("cronjob-nightly.yaml", {"CronJob"}),
        ("redis.yaml", {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"}),
        ("configmap.yaml", {"ConfigMap"}),
        ("secret.example.yaml", {"Secret"}),
        ("serviceaccount.yaml", {"ServiceAccount"}),
        ("networkpolicy.yaml", {"NetworkPolicy"}),
    ],
)
def test_manifest_has_the_expected_kinds(filename: str, kinds: set[str]) -> None:
    assert {d["kind"] for d in _docs(K8S / filename)} == kinds


def test_object_names_are_unique_per_kind() -> None:
    seen = [(o["kind"], o["metadata"]["name"]) for o in _objects()]
    assert len(seen) == len(set(seen)), f"duplicates: {sorted(x for x in seen if seen.count(x) > 1)}"


# ---- the Ray cluster ------------------------------------------------------------------------------


def test_raycluster_has_head_cpu_and_gpu_groups() -> None:
    rc = _raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "actors must not run on the head"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for name, group in groups.items():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    # A run sizes its feature-worker pool from the GPUs present when it starts: no scale-to-zero.
    assert groups["gpu"]["minReplicas"] == groups["gpu"]["replicas"]
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits.get("nvidia.com/gpu", 0) >= 1
    cpu_limits = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu_limits


def test_ray_start_params_are_strings() -> None:
    # KubeRay's rayStartParams is map[string]string: a bare YAML number is rejected on apply.
    spec = _raycluster()["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), f"rayStartParams.{key} must be quoted, got {value!r}"


def test_ray_version_matches_the_images() -> None:
    ray_version = _raycluster()["spec"]["rayVersion"]
    for dockerfile in DOCKERFILES:
        assert _arg_default(dockerfile.read_text(), "RAY_VERSION") == ray_version, dockerfile.name


def test_gpu_group_uses_the_gpu_image_and_the_rest_the_cpu_image() -> None:
    spec = _raycluster()["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    image = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"] == image
    assert groups["gpu"]["template"]["spec"]["containers"][0]["image"] == image + "-gpu"
    (cron,) = _of_kind("CronJob")
    scheduler = _pod_specs(cron)[0]["containers"][0]
    assert scheduler["image"] == image, "the scheduler must run the cluster's Ray and Python versions"


# ---- the nightly CronJob --------------------------------------------------------------------------


def test_cronjob_runs_the_scheduler_against_the_ray_cluster() -> None:
    (cron,) = _of_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = _pod_specs(cron)[0]["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    head_service = _raycluster()["metadata"]["name"] + "-head-svc"
    assert re.fullmatch(rf"ray://{re.escape(head_service)}:10001", env.get("RAY_ADDRESS") or ""), env
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "patchaudit audit --spec" in script  # the audit (lines, ledger, resume), not a hand-written loop


def test_run_config_is_valid_for_the_scheduler() -> None:
    config = pytest.importorskip("patchaudit.scheduler.config")
    (cm,) = [o for o in _of_kind("ConfigMap") if o["metadata"]["name"] == "patchaudit-run-config"]
    data = yaml.safe_load(cm["data"]["run.yaml"])
    loaded = config.config_from_dict(data, "patchaudit-run-config")  # unknown keys raise ConfigError
    assert loaded.run.reclaim_idle_s == data["run"]["reclaim_idle_s"]
    (cron,) = _of_kind("CronJob")
    pod = _pod_specs(cron)[0]
    mount = next(m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == "run-config")
    assert f"--spec {mount}/audit.yaml" in " ".join(pod["containers"][0]["args"])


def test_audit_spec_is_valid(tmp_path) -> None:
    audit_spec = pytest.importorskip("patchaudit.scheduler.audit_spec")
    (cm,) = [o for o in _of_kind("ConfigMap") if o["metadata"]["name"] == "patchaudit-run-config"]
    for name, text in cm["data"].items():  # the mounted folder, as the pod sees it
        (tmp_path / name).write_text(text)
    spec = audit_spec.load_spec(str(tmp_path / "audit.yaml"))  # unknown keys, bad templates raise ConfigError
    run = yaml.safe_load(cm["data"]["run.yaml"])["run"]
    assert spec.lines and all(line.config.run.batch_size == run["batch_size"] for line in spec.lines)


# ---- cross references and pod security ------------------------------------------------------------


def test_referenced_configmaps_secrets_claims_and_accounts_exist() -> None:
    configmaps, secrets = _names("ConfigMap"), _names("Secret")
    claims, accounts = _names("PersistentVolumeClaim"), _names("ServiceAccount")
    specs = _all_pod_specs()
    assert len(specs) >= 5  # redis, cronjob, head, two worker groups
    for spec in specs:
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, volume
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, volume
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, source
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, source


def test_redis_service_selects_the_redis_pods() -> None:
    (deployment,) = _of_kind("Deployment")
    service = next(s for s in _of_kind("Service") if s["metadata"]["name"] == "patchaudit-redis")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (url,) = [s["stringData"]["REDIS_URL"] for s in _of_kind("Secret") if "REDIS_URL" in s.get("stringData", {})]
    parsed = urlsplit(url)
    assert parsed.scheme in {"redis", "rediss"} and parsed.hostname == service["metadata"]["name"], url
    assert parsed.port == service["spec"]["ports"][0]["port"], url


def test_every_pod_runs_as_non_root_without_privilege_escalation() -> None:
    for spec in _all_pod_specs():
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, spec["containers"][0]["name"]
        for container in spec["containers"]:
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, container["name"]


# ---- Dockerfiles ----------------------------------------------------------------------------------


def test_final_stage_user_finds_root_and_missing_users() -> None:
    # The checks below rely on this helper; make sure it can say "root".
    assert _final_stage_user("FROM a AS b\nUSER 10001\nFROM c\nUSER root\n") == "root"
    assert _final_stage_user("FROM a AS b\nUSER 10001\nFROM c\nRUN true\n") is None
    assert _final_stage_user("FROM a\nUSER 0:0\n") == "0"
    assert _final_stage_user("FROM a\nRUN a \\\n  USER root\nUSER 7:7\n") == "7"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_does_not_run_as_root(dockerfile: Path) -> None:
    user = _final_stage_user(dockerfile.read_text())
    assert user is not None, f"{dockerfile.name}: the final stage has no USER line (it would run as root)"
    assert user not in {"root", "0"}, f"{dockerfile.name} runs as {user}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_package_with_weights_and_enters_patchaudit(dockerfile: Path) -> None:
    instructions = _dockerfile_instructions(dockerfile.read_text())
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert re.search(r"pip install [^;&]*\"\.\[weights\]\"", runs), "pip install .[weights] missing"
    assert "--no-cache-dir" in runs or any(
        word == "ENV" and "PIP_NO_CACHE_DIR=1" in args for word, args in instructions
    )
    entrypoints = [args for word, args in instructions if word == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == '["patchaudit"]'


def test_dockerfile_torch_pins_match_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(
        re.fullmatch(r"(torch|torchvision)==(\S+)", d).groups()
        for d in deps
        if re.fullmatch(r"(torch|torchvision)==\S+", d)
    )
    assert set(pins) == {"torch", "torchvision"}
    for dockerfile in DOCKERFILES:
        for name, version in re.findall(r"\b(torch|torchvision)==(\S+)", dockerfile.read_text()):
            assert version.rstrip(";") == pins[name], f"{dockerfile.name}: {name}=={version}"


# ---- VM material and the guide --------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_vm_script_is_valid_bash() -> None:
    script = DEPLOY / "vm" / "ray-node.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_readme_says_the_manifests_were_not_applied() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "never applied" in text and "syntactically" in text


# ---- Ray token authentication ---------------------------------------------------------------------


def test_every_ray_node_and_the_driver_get_the_ray_token() -> None:
    """Ray starts clusters with token authentication: the head, every worker group and the CronJob's
    driver must all read RAY_AUTH_MODE=token and the same RAY_AUTH_TOKEN (one Secret)."""
    (secret,) = [s for s in _of_kind("Secret") if s["metadata"]["name"] == "patchaudit-ray-auth"]
    assert secret["stringData"]["RAY_AUTH_MODE"] == "token" and secret["stringData"]["RAY_AUTH_TOKEN"]
    pods = [*_pod_specs(_raycluster()), *_pod_specs(_of_kind("CronJob")[0])]
    for spec in pods:
        for container in spec["containers"]:
            refs = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            assert "patchaudit-ray-auth" in refs, container["name"]


def test_vm_files_carry_the_ray_token() -> None:
    env = (DEPLOY / "vm" / "patchaudit.env.example").read_text()
    assert re.search(r"^RAY_AUTH_MODE=token$", env, re.M) and re.search(r"^RAY_AUTH_TOKEN=\S+", env, re.M)
    unit = (DEPLOY / "vm" / "patchaudit-ray-worker.service").read_text()
    assert "EnvironmentFile=/etc/patchaudit/patchaudit.env" in unit and "RAY_AUTH_TOKEN" in unit
    assert "RAY_AUTH_MODE" in (DEPLOY / "vm" / "ray-node.sh").read_text()
    guide = (DEPLOY / "vm" / "README.md").read_text()
    assert "RAY_AUTH_MODE=token" in guide and "RAY_AUTH_TOKEN" in guide


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_vm_script_refuses_a_node_without_the_token(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake_ray = venv / "bin" / "ray"
    fake_ray.write_text('#!/bin/sh\necho started "$@"\n')
    fake_ray.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PATCHAUDIT_VENV": str(venv), "HF_HUB_OFFLINE": "1"}
    script = str(DEPLOY / "vm" / "ray-node.sh")
    refused = subprocess.run(["bash", script, "head"], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "RAY_AUTH_MODE=token" in refused.stderr
    ok = subprocess.run(
        ["bash", script, "head"],
        env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and ok.stdout.startswith("started start --head"), ok.stderr
