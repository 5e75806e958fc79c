"""What deploy/ holds, loaded once for the tests of it (``test_deploy*.py``): its paths,
the YAML, Kubernetes objects and pod containers, the Dockerfile's stages, and the SNAPFERRY_*
names the code reads."""

from __future__ import annotations

import ast
import json
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "kubernetes"
VALUES = K8S / "temporal-values.yaml"
SYSTEMD = DEPLOY / "systemd"

K8S_VERSION = "1.30"
OUR_IMAGE = "snapferry-worker"
FRONTEND = "temporal-frontend.temporal.svc:7233"  # the official chart, release "temporal"
ENV_TOKEN = re.compile(r"\bSNAPFERRY_[A-Z0-9_]*[A-Z0-9]\b")
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|PWD|KEY|TOKEN|SECRET)$", re.IGNORECASE)
POD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job", "ReplicaSet"}
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


# -- loading ---------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@cache
def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


@cache
def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]["version"]


@cache
def project_extras() -> set[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


@cache
def k8s_objects() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(where, object) for every Kubernetes object in deploy/kubernetes, including the Job
    that the Helm values deploy through extraObjects."""
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path == VALUES:
            continue
        for i, doc in enumerate(load_all(path)):
            found.append((f"{path.relative_to(DEPLOY)}#{i}", doc))
    for i, obj in enumerate(values().get("extraObjects", [])):
        found.append((f"{VALUES.relative_to(DEPLOY)}:extraObjects[{i}]", obj))
    return tuple(found)


def manifests() -> list[dict[str, Any]]:
    """The objects `kubectl apply -f deploy/kubernetes` (and mtls/) creates."""
    return [obj for where, obj in k8s_objects() if "extraObjects" not in where]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in manifests() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in POD_KINDS:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def pod_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container of every Kubernetes object."""
    out = []
    for where, obj in k8s_objects():
        pod = pod_spec(obj)
        for c in containers(pod) if pod else []:
            out.append((f"{where} {obj['kind']}/{obj['metadata']['name']}/{c['name']}", pod, c))
    return out


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    out = []
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """The Dockerfile's stages as (resolved base image, instructions)."""
    args = {}
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for instruction, rest in dockerfile():
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif instruction == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
            stages.append((image, []))
        elif stages:
            stages[-1][1].append((instruction, rest))
    return stages


@cache
def entrypoint() -> list[str]:
    runtime = dockerfile_stages()[-1][1]
    [final] = [rest for instruction, rest in runtime if instruction == "ENTRYPOINT"]
    return json.loads(final)


@cache
def source_env_names() -> frozenset[str]:
    """SNAPFERRY_* names in the string literals (not docstrings) of activities/ and workers/."""
    names: set[str] = set()
    for package in ("activities", "workers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            docstrings = set()
            for node in ast.walk(tree):
                if isinstance(node, DOCUMENTED):
                    first = node.body[0] if node.body else None
                    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                        docstrings.add(id(first.value))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and id(node) not in docstrings
                ):
                    names.update(ENV_TOKEN.findall(node.value))
    return frozenset(names)


def compose_env(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def our_compose_services() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if svc.get("image", "").split(":")[0] == OUR_IMAGE
    }
