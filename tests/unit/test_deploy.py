"""deploy/ checked statically, offline: nothing here builds an image or talks to a cluster.

- every YAML file parses (multi-document);
- compose.yaml against the compose-spec JSON Schema that check-jsonschema vendors;
- every Kubernetes object (the manifests and the Helm values' extraObjects) against the
  Kubernetes 1.30 strict schemas that kubernetes-validate ships;
- the Helm values have the keys the deployment relies on;
- every SNAPFERRY_* variable named in deploy/ is one the code reads, so a rename breaks here;
- every snapferry command a container, probe or unit runs parses with the real CLI parser;
- every image is pinned, ours is tagged with the project's version, the Dockerfile's
  entrypoint is snapferry and it installs the hypervisor extras;
- no secret has a literal value: only *_FILE variables that point at a mounted secret;
- every codec server passes the rule the server itself applies at startup (a token or mutual
  TLS beyond loopback), compose publishes it on the host's loopback only, and the UI's codec
  endpoint is the capability URL built from the same token secret.
"""

from __future__ import annotations

import ast
import importlib.resources
import json
import re
import shlex
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from snapferry.workers.cli import build_parser
from snapferry.workers.codec import TOKEN_FILE_ENV, CodecAuth, startup_problem

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


def test_codec_server_and_ui_agree() -> None:
    services = compose()["services"]
    ui_env = compose_env(services["temporal-ui"])
    codec_cmd = services["codec-server"]["command"]
    assert codec_cmd[codec_cmd.index("--ui-origin") + 1] == ui_env["TEMPORAL_CORS_ORIGINS"]
    ui_port = ui_env["TEMPORAL_CORS_ORIGINS"].rsplit(":", 1)[1]
    assert f"{ui_port}:8080" in services["temporal-ui"]["ports"]
    codec_port = ui_env["CODEC_BASE_URL"].rsplit(":", 1)[1]
    assert services["codec-server"]["ports"] == [f"127.0.0.1:{codec_port}:8081"]

    web_env = {e["name"]: e.get("value") for e in values()["web"]["additionalEnv"]}
    codec = find("Deployment", "snapferry-codec-server")["spec"]["template"]["spec"]
    args = codec["containers"][0]["args"]
    assert args[args.index("--ui-origin") + 1] == web_env["TEMPORAL_CORS_ORIGINS"]


def codec_servers() -> list[tuple[str, list[str], dict[str, Any], set[str]]]:
    """(where, argv after `snapferry`, environment, secret files mounted) for every codec
    server that deploy/ runs."""
    found = []
    declared = compose()["secrets"]
    for name, svc in our_compose_services().items():
        if svc["command"][0] == "codec-server":
            mounted = {f"/run/secrets/{s}" for s in svc.get("secrets", []) if s in declared}
            found.append((f"compose {name}", svc["command"], compose_env(svc), mounted))
    for where, pod, c in pod_containers():
        args = c.get("args", [])
        if c["image"].split(":")[0] != OUR_IMAGE or args[:1] != ["codec-server"]:
            continue
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        mounted = set()
        for m in c.get("volumeMounts", []):
            for v in pod.get("volumes", []):
                if v["name"] == m["name"] and "secret" in v:
                    mounted.add(m["mountPath"])
        found.append((where, args, env, mounted))
    return found


@pytest.mark.parametrize(
    "where,argv,env,mounted", codec_servers(), ids=[w for w, *_ in codec_servers()]
)
def test_codec_server_is_never_exposed_without_authentication(
    where: str, argv: list[str], env: dict[str, Any], mounted: set[str]
) -> None:
    args = build_parser().parse_args(argv)
    token_file = env.get(TOKEN_FILE_ENV)
    if token_file:  # the file must come from a mounted secret (compose: the file itself)
        assert token_file in mounted or any(token_file.startswith(m + "/") for m in mounted), (
            f"{where}: {TOKEN_FILE_ENV}={token_file} is not in a mounted secret"
        )
    auth = CodecAuth(
        token="placeholder-for-the-mounted-token-file" if token_file else None,
        tls_cert=Path(args.tls_cert_file) if args.tls_cert_file else None,
        tls_key=Path(args.tls_key_file) if args.tls_key_file else None,
        client_ca=Path(args.tls_client_ca_file) if args.tls_client_ca_file else None,
        insecure_no_auth=args.insecure_no_auth,
    )
    problem = startup_problem(args.host, auth)
    assert problem is None, f"{where}: the codec server would refuse to start: {problem}"
    assert auth.authenticated, f"{where}: serves {args.host} without authentication"


def test_the_ui_calls_the_codec_server_with_its_token() -> None:
    services = compose()["services"]
    codec_env = compose_env(services["codec-server"])
    token_secret = codec_env[TOKEN_FILE_ENV].removeprefix("/run/secrets/")
    ui = services["temporal-ui"]
    assert token_secret in ui["secrets"], "the UI reads the same token secret"
    assert ui["entrypoint"][:2] == ["/bin/sh", "-c"]
    [script] = [arg.replace("$$", "$") for arg in ui["entrypoint"][2:]]  # as compose reads it
    # The capability URL <codec URL>/<token>, then the image's own entrypoint.
    assert re.search(
        rf'export TEMPORAL_CODEC_ENDPOINT="\$CODEC_BASE_URL/\$\(cat /run/secrets/{token_secret}\)"'
        r" && exec /home/ui-server/start-ui-server\.sh$",
        script,
    ), script
    assert "TEMPORAL_CODEC_ENDPOINT" not in compose_env(ui), "the endpoint holds the token"
    assert "TEMPORAL_CODEC_PASS_ACCESS_TOKEN" not in compose_env(ui)  # an OIDC token, not ours


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


# -- Prometheus: the scrape config and alert rules, checked by Prometheus's own tool ---------
PROMETHEUS = DEPLOY / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )


def test_prometheus_config_and_rules_are_valid() -> None:
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", "snapferry-rules.yml")
    assert rules.returncode == 0 and "3 rules found" in rules.stdout, rules.stdout + rules.stderr


def test_alert_rules_fire_when_they_should_and_only_then() -> None:
    tested = promtool("test", "rules", "snapferry-rules.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_alert_rules_use_metrics_the_code_exports() -> None:
    """Every snapferry_* metric a rule names is one the workflows or activities record."""
    import re

    rules = (PROMETHEUS / "snapferry-rules.yml").read_text()
    source = "".join(p.read_text() for p in (ROOT / "workflows").glob("*.py")) + "".join(
        p.read_text() for p in (ROOT / "activities").glob("*.py")
    )
    for name in set(re.findall(r"snapferry_[a-z_]+", rules)):
        base = name.removesuffix("_total").removeprefix("snapferry_")
        assert f'"{base}"' in source or f'"snapferry_{base}"' in source, name
