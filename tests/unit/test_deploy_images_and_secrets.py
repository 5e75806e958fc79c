"""deploy/'s images and secrets, offline: every image is pinned, ours is tagged with the
project's version, the Dockerfile's entrypoint is snapferry and it installs the hypervisor
extras; no secret has a literal value, only *_FILE variables that point at a mounted secret."""

from __future__ import annotations

import re
from typing import Any

import pytest

from .deploy_files import (
    COMPOSE,
    DOCKERFILE,
    OUR_IMAGE,
    SECRET_NAME,
    SYSTEMD,
    VALUES,
    compose,
    compose_env,
    dockerfile_stages,
    entrypoint,
    k8s_objects,
    manifests,
    our_compose_services,
    pod_containers,
    project_extras,
    project_version,
    values,
)


# -- images and the Dockerfile ---------------------------------------------------------------
def images() -> list[tuple[str, str]]:
    found = [(f"compose {n}", s["image"]) for n, s in compose()["services"].items()]
    found += [(where, c["image"]) for where, _pod, c in pod_containers()]
    found += [(f"Dockerfile stage {i}", image) for i, (image, _) in enumerate(dockerfile_stages())]
    return found


@pytest.mark.parametrize("where,image", images(), ids=[w for w, _ in images()])
def test_image_is_pinned(where: str, image: str) -> None:
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    assert ":" in last or digest, f"{where}: {image} has no tag"
    tag = last.partition(":")[2]
    assert tag and tag != "latest", f"{where}: {image} is not pinned"
    if last.split(":")[0] == OUR_IMAGE:
        assert tag == project_version(), f"{where}: {image} is not the pyproject version"


def test_compose_builds_our_image_from_the_dockerfile() -> None:
    for name, svc in our_compose_services().items():
        build = svc["build"]
        dockerfile_path = COMPOSE.parent / build["context"] / build["dockerfile"]
        assert dockerfile_path.resolve() == DOCKERFILE, name


def test_dockerfile() -> None:
    stages = dockerfile_stages()
    bases = {image for image, _ in stages}
    assert len(bases) == 1, f"builder and runtime differ: {bases}"
    [base] = bases
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert entrypoint() == ["snapferry"]

    builder, runtime = stages[0][1], stages[-1][1]
    build_runs = " ".join(rest for instruction, rest in builder if instruction == "RUN")
    for package in ("libvirt-dev", "pkg-config", "gcc"):
        assert re.search(rf"\b{re.escape(package)}\b", build_runs), package
    [extras] = re.findall(r"pip install [^\n]*?\.\[([\w,\s-]+)\]", build_runs)
    installed = {e.strip() for e in extras.split(",")}
    assert installed >= {"kvm", "vmware", "xenserver"}
    assert installed <= project_extras()

    runtime_runs = " ".join(rest for instruction, rest in runtime if instruction == "RUN")
    for package in ("libvirt0", "qemu-utils"):
        assert re.search(rf"\b{re.escape(package)}\b", runtime_runs), package
    assert "gcc" not in runtime_runs and "libvirt-dev" not in runtime_runs
    [user] = [rest for instruction, rest in runtime if instruction == "USER"][-1:]
    assert user.split(":")[0] not in ("0", "root"), "the image's default user is root"


# -- secrets ---------------------------------------------------------------------------------
def test_compose_has_no_inline_secret() -> None:
    declared = compose()["secrets"]
    for name, secret in declared.items():
        assert set(secret) == {"file"}, f"secret {name}: only files"
    for name, svc in compose()["services"].items():
        mounted = {s if isinstance(s, str) else s["source"] for s in svc.get("secrets", [])}
        assert mounted <= set(declared), name
        for var, value in compose_env(svc).items():
            if SECRET_NAME.search(var):
                assert value in (None, ""), f"compose {name}: {var} has a literal value"
            if var.endswith("_FILE") and str(value).startswith("/run/secrets/"):
                secret = str(value).removeprefix("/run/secrets/")
                assert secret in mounted, f"compose {name}: {var} -> unmounted {secret}"


def test_kubernetes_has_no_inline_secret() -> None:
    configmaps = {
        o["metadata"]["name"]: o.get("data", {}) for o in manifests() if o["kind"] == "ConfigMap"
    }
    for data in configmaps.values():
        for var in data:
            assert not SECRET_NAME.search(var), f"ConfigMap key {var} looks like a secret"
    for where, obj in k8s_objects():
        assert obj["kind"] != "Secret", f"{where}: ship Secret references, not Secrets"

    for where, pod, c in pod_containers():
        secret_mounts = {
            m["mountPath"]
            for m in c.get("volumeMounts", [])
            for v in pod.get("volumes", [])
            if v["name"] == m["name"] and "secret" in v
        }
        env: dict[str, str | None] = {}
        for ref in c.get("envFrom", []):
            if "configMapRef" in ref:
                env.update(configmaps.get(ref["configMapRef"]["name"], {}))
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]):
                assert "value" not in e, f"{where}: {e['name']} has a literal value"
                assert "secretKeyRef" in e["valueFrom"], f"{where}: {e['name']}"
            env[e["name"]] = e.get("value")
        for var, value in env.items():
            if var.startswith("SNAPFERRY_") and var.endswith("_FILE"):
                assert value and any(value.startswith(m + "/") for m in secret_mounts), (
                    f"{where}: {var}={value} is not in a mounted Secret"
                )

    web_env = values()["web"]["additionalEnv"]
    assert not [e for e in web_env if SECRET_NAME.search(e["name"]) and "value" in e]


def test_temporal_values_hold_no_password() -> None:
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and re.fullmatch(r"(?i)password|pwd|secret", key):
                    pytest.fail(f"{VALUES.name}: {path}.{key} holds a secret value")
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")

    walk(values(), "")


def test_systemd_units_hold_no_secret() -> None:
    for unit in sorted(SYSTEMD.glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith("Environment="):
                var = line.removeprefix("Environment=").split("=", 1)[0]
                assert not SECRET_NAME.search(var), f"{unit.name}: {var}"
            assert not re.search(r"--\w*(password|token)\b", line), f"{unit.name}: {line}"
