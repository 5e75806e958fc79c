"""deploy/ checked statically, offline: nothing here builds an image or talks to a cluster.

- every YAML file parses (multi-document);
- compose.yaml against the compose-spec JSON Schema that check-jsonschema vendors;
- every Kubernetes object (the manifests and the Helm values' extraObjects) against the
  Kubernetes 1.30 strict schemas that kubernetes-validate ships;
- the Helm values have the keys the deployment relies on;
- every SNAPFERRY_* variable named in deploy/ is one the code reads, so a rename breaks here;
- every snapferry command a container, probe or unit runs parses with the real CLI parser.

The codec server (test_deploy_codec.py), images and secrets (test_deploy_images_and_secrets.py)
and Prometheus's rules (test_deploy_prometheus.py) have files of their own; what they all
load is in deploy_files.py.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from snapferry.workers.cli import build_parser

from .deploy_files import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    ENV_TOKEN,
    FRONTEND,
    K8S_VERSION,
    OUR_IMAGE,
    ROOT,
    SYSTEMD,
    VALUES,
    compose,
    compose_env,
    containers,
    entrypoint,
    find,
    k8s_objects,
    load_all,
    manifests,
    our_compose_services,
    pod_containers,
    pod_spec,
    source_env_names,
    values,
    yaml_files,
)


# -- YAML and schemas ------------------------------------------------------------------------
def test_expected_files_exist() -> None:
    for path in (COMPOSE, DOCKERFILE, VALUES, DEPLOY / "README.md"):
        assert path.is_file(), path
    assert sorted(p.name for p in SYSTEMD.glob("*.service")) == [
        "snapferry-backup-worker.service",
        "snapferry-host-worker.service",
    ]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: a document is not a mapping"


def test_compose_matches_compose_spec() -> None:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(ref.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors
    )


@pytest.mark.parametrize(
    "where,obj",
    k8s_objects(),
    ids=[f"{o['kind']}/{o['metadata']['name']}" for _, o in k8s_objects()],
)
def test_kubernetes_object_is_valid(where: str, obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        pytest.fail(f"{where}: {path}: {err.message}")
    except kubernetes_validate.SchemaNotFoundError as err:
        pytest.fail(f"{where}: {err.message}")


def test_kubernetes_objects_fit_together() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in manifests())
    for expected in [
        ("Namespace", "snapferry"),
        ("ConfigMap", "snapferry-env"),
        ("DaemonSet", "snapferry-host-worker"),
        ("Deployment", "snapferry-backup-worker"),
        ("HorizontalPodAutoscaler", "snapferry-backup-worker"),
        ("Deployment", "snapferry-codec-server"),
        ("Service", "snapferry-codec-server"),
    ]:
        assert expected in kinds, f"missing {expected}"
    for obj in manifests():
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "snapferry", obj["metadata"]["name"]

    env = find("ConfigMap", "snapferry-env")["data"]
    assert env["SNAPFERRY_TEMPORAL_ADDRESS"] == FRONTEND

    configmaps = {o["metadata"]["name"] for o in manifests() if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in manifests() if o["kind"] == "PersistentVolumeClaim"}
    for obj in manifests():
        pod = pod_spec(obj)
        if pod is None:
            continue
        labels = obj["spec"]["template"]["metadata"]["labels"]
        selector = obj["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), f"{obj['metadata']['name']}: selector"
        for c in containers(pod):
            for ref in c.get("envFrom", []):
                cm = ref.get("configMapRef")
                assert cm is None or cm.get("optional") or cm["name"] in configmaps, cm
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])}, c["name"]
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume

    host = find("DaemonSet", "snapferry-host-worker")["spec"]["template"]["spec"]
    assert host["nodeSelector"] == {"snapferry.io/hypervisor": "kvm"}
    worker = host["containers"][0]
    node_name = {e["name"]: e for e in worker["env"]}["NODE_NAME"]
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "$(NODE_NAME)" in worker["args"]
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert {"/var/run/libvirt", "/var/lib/libvirt/images"} <= mounts
    assert {v["hostPath"]["path"] for v in host["volumes"] if "hostPath" in v} == {
        "/var/run/libvirt",
        "/var/lib/libvirt/images",
    }

    backup = find("Deployment", "snapferry-backup-worker")
    assert backup["spec"]["replicas"] == 2
    backup_worker = backup["spec"]["template"]["spec"]["containers"][0]
    assert backup_worker["resources"]["requests"], "the HPA needs resource requests"
    assert backup_worker["livenessProbe"]["exec"]["command"][0] == "snapferry"
    hpa = find("HorizontalPodAutoscaler", "snapferry-backup-worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "snapferry-backup-worker",
    }

    codec = find("Deployment", "snapferry-codec-server")
    service = find("Service", "snapferry-codec-server")
    codec_labels = codec["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= codec_labels.items()


def test_temporal_values_have_what_the_deployment_relies_on() -> None:
    server = values()["server"]["config"]
    persistence = server["persistence"]
    assert persistence["defaultStore"] in persistence["datastores"]
    assert persistence["visibilityStore"] in persistence["datastores"]
    for store in (persistence["defaultStore"], persistence["visibilityStore"]):
        sql = persistence["datastores"][store]["sql"]
        assert sql["pluginName"] == "postgres12"
        assert sql["connectAddr"] and sql["databaseName"] and sql["user"]
        assert sql["existingSecret"], "the database password comes from a Secret"
    namespace = find("ConfigMap", "snapferry-env")["data"]["SNAPFERRY_NAMESPACE"]
    assert server["namespaces"]["create"] is True
    assert namespace in {ns["name"] for ns in server["namespaces"]["namespace"]}

    web = values()["web"]
    web_env = {e["name"]: e for e in web["additionalEnv"]}
    assert web.get("enabled", True)
    # The codec endpoint holds the codec token (the capability URL): from a Secret.
    assert web_env["TEMPORAL_CODEC_ENDPOINT"]["valueFrom"]["secretKeyRef"] == {
        "name": "temporal-codec-endpoint",
        "key": "endpoint",
    }
    assert web_env["TEMPORAL_CORS_ORIGINS"]["value"]

    [job] = [o for o in values()["extraObjects"] if o["kind"] == "Job"]
    [sa] = job["spec"]["template"]["spec"]["containers"]
    sa_env = {e["name"]: e["value"] for e in sa["env"]}
    assert sa_env == {"TEMPORAL_ADDRESS": FRONTEND, "TEMPORAL_NAMESPACE": namespace}


def search_attributes_in(script: str) -> set[str]:
    [names] = re.findall(r"for name in ([\w ]+); do", script)
    assert "search-attribute create" in script and "--type Keyword" in script
    return set(names.split())


def test_search_attributes_match_the_workflows() -> None:
    routing = (ROOT / "workflows" / "routing.py").read_text()
    expected = set(re.findall(r'SearchAttributeKey\.for_keyword\("(\w+)"\)', routing))
    assert expected >= {"VolumeId", "VmId", "SnapshotId", "SnapshotState", "Hypervisor"}
    compose_job = compose()["services"]["temporal-search-attributes"]
    assert search_attributes_in(compose_job["entrypoint"][-1]) == expected
    assert compose_env(compose_job)["TEMPORAL_NAMESPACE"] == "snapferry"
    assert compose()["services"]["temporal"]["environment"]["DEFAULT_NAMESPACE"] == "snapferry"
    [job] = [o for o in values()["extraObjects"] if o["kind"] == "Job"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert search_attributes_in(container["args"][-1]) == expected


# -- environment variables -------------------------------------------------------------------
def test_every_snapferry_variable_in_deploy_is_read_by_the_code() -> None:
    known = source_env_names()
    assert "SNAPFERRY_TEMPORAL_ADDRESS" in known  # the scan itself works
    missing = []
    local_secrets = DEPLOY / "compose" / "secrets"  # an operator's files, not ours
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        if local_secrets in path.parents:
            continue
        for name in sorted(set(ENV_TOKEN.findall(path.read_text()))):
            if name not in known:
                missing.append(f"{path.relative_to(DEPLOY)}: {name}")
    assert not missing, "not read anywhere in activities/ or workers/:\n" + "\n".join(missing)


def test_every_service_uses_the_same_settings() -> None:
    for name, svc in our_compose_services().items():
        env = compose_env(svc)
        if svc["command"][0] == "worker":
            assert env["SNAPFERRY_TEMPORAL_ADDRESS"] == "temporal:7233", name
            assert env["SNAPFERRY_NAMESPACE"] == "snapferry", name
        assert env["SNAPFERRY_CODEC_KEYS_FILE"] == "/run/secrets/codec_keys", name


# -- commands --------------------------------------------------------------------------------
def placeholders(arg: str) -> str:
    """$(NODE_NAME) (Kubernetes) and ${SNAPFERRY_HOST} (systemd) as a sample value."""
    return re.sub(r"\$\((\w+)\)|\$\{(\w+)\}|\$(\w+)", "sample-host", arg)


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every snapferry command that deploy/ runs, probes included."""
    found: list[tuple[str, list[str]]] = []
    for name, svc in our_compose_services().items():
        assert "entrypoint" not in svc, f"compose {name}: use the image's entrypoint"
        command = svc["command"]
        args = shlex.split(command) if isinstance(command, str) else command
        found.append((f"compose {name}", entrypoint() + args))
    for where, _pod, c in pod_containers():
        if c["image"].split(":")[0] == OUR_IMAGE:
            found.append((where, c.get("command", entrypoint()) + c.get("args", [])))
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            command = c.get(probe, {}).get("exec", {}).get("command")
            if command:
                found.append((f"{where} {probe}", command))
    for unit in sorted(SYSTEMD.glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                found.append((unit.name, shlex.split(line.removeprefix("ExecStart="))))
    return found


@pytest.mark.parametrize("where,argv", commands(), ids=[w for w, _ in commands()])
def test_command_parses_with_the_real_cli(where: str, argv: list[str]) -> None:
    assert Path(argv[0]).name == "snapferry", f"{where}: {argv}"
    args = [placeholders(a) for a in argv[1:]]
    # codec-server is in workers/cli's parser (added with workers/codec.py); these
    # commands parse against it like every other one.
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exit_:
        if exit_.code == 0 and args == ["--help"]:  # a probe: the CLI loads and answers
            return
        pytest.fail(f"{where}: `snapferry {' '.join(args)}` is refused by the CLI parser")
    if parsed.command == "worker":
        assert parsed.host or parsed.backup, f"{where}: a worker serves nothing"
        if parsed.host:
            assert all(parsed.host), f"{where}: empty --host"
        if parsed.backup:
            assert parsed.concurrency >= 1
    else:
        assert parsed.command == "codec-server", f"{where}: unexpected {parsed.command}"
        assert parsed.host == "0.0.0.0" and parsed.port == 8081
        assert not parsed.insecure_no_auth, f"{where}: an unauthenticated codec server"


def test_the_expected_processes_run() -> None:
    runs = {w: placeholders(" ".join(argv[1:])) for w, argv in commands()}
    expected = {
        "worker --backup --concurrency 4",
        "worker --host kvm01",
        "worker --host sample-host",
        "codec-server --host 0.0.0.0 --port 8081 --ui-origin http://localhost:8080",
    }
    assert expected <= set(runs.values()), runs
