"""deploy/'s codec servers, offline: each passes the rule the server itself applies at
startup (a token or mutual TLS beyond loopback), compose publishes it on the host's loopback
only, and the UI's codec endpoint is the capability URL built from the same token secret."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from snapferry.workers.cli import build_parser
from snapferry.workers.codec import TOKEN_FILE_ENV, CodecAuth, startup_problem

from .deploy_files import (
    OUR_IMAGE,
    compose,
    compose_env,
    find,
    our_compose_services,
    pod_containers,
    values,
)


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
