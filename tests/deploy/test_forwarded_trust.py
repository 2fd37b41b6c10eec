"""Whose X-Forwarded-For the shipped deployments trust: only their proxy's, so a client cannot claim an address.

With FORWARDED_ALLOW_IPS=* uvicorn took a client's own `X-Forwarded-For: 127.0.0.1` as its address, and /metrics
(allowed by address: METRICS_ALLOWED_CIDRS) answered it with key, backend and pool names. These tests read the
value each deployment ships and run the production server (scripts/serve.sh) with it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.serve import ServeProcess

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
INTERNAL = "10.99.0.0/16"  # the network /metrics is allowed from, in these tests (not the test client's address)


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def _default(value: str) -> str:
    """A compose value with its variables at their defaults: "${PROXY_IP:-172.31.240.10}" → "172.31.240.10"."""
    return value.split(":-", 1)[1].rstrip("}") if value.startswith("${") else value


def shipped_values() -> dict[str, str]:
    """FORWARDED_ALLOW_IPS of every shipped deployment (compose: with its variables at their defaults)."""
    compose = _default(_compose()["services"]["web"]["environment"]["FORWARDED_ALLOW_IPS"])
    base = _env_file(DEPLOY / "k8s" / "base" / "platform.env")["FORWARDED_ALLOW_IPS"]
    values = {"compose": compose, "k8s base": base}
    for overlay in (DEPLOY / "k8s" / "overlays").iterdir():
        kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        for generator in kustomization.get("configMapGenerator", []):
            for literal in generator.get("literals", []):
                if literal.startswith("FORWARDED_ALLOW_IPS="):
                    values[f"k8s {overlay.name}"] = literal.split("=", 1)[1]
    return values


@pytest.mark.parametrize("deployment", sorted(shipped_values()))
def test_no_deployment_trusts_every_address(deployment: str) -> None:
    # given the value a deployment ships / then it names addresses, never "*" (or a network that holds everyone)
    value = shipped_values()[deployment]
    for entry in value.split(","):
        assert entry.strip() != "*", deployment
        network = ipaddress.ip_network(entry.strip(), strict=False)
        assert network.prefixlen >= (24 if network.version == 4 else 64), (deployment, entry)


def test_compose_trusts_exactly_its_proxy() -> None:
    # given the compose file / then the web replicas trust the address the nginx proxy is given, and nginx
    # replaces a client's X-Forwarded-For instead of appending to it
    compose = _compose()
    proxy_ip = compose["services"]["proxy"]["networks"]["default"]["ipv4_address"]
    assert compose["services"]["web"]["environment"]["FORWARDED_ALLOW_IPS"] == proxy_ip
    subnet = compose["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(_default(proxy_ip)) in ipaddress.ip_network(_default(subnet))
    nginx = (DEPLOY / "compose" / "nginx.conf").read_text()
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in nginx
    assert "$proxy_add_x_forwarded_for" not in nginx


def _metrics_status(server: ServeProcess, forwarded_for: str, *, source: str = "127.0.0.1") -> int:
    """/metrics's status for a client connecting from `source` (any 127.x address is local on Linux)."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as client:
        return client.get(f"{server.url}/metrics", headers={"X-Forwarded-For": forwarded_for}).status_code


@pytest.mark.parametrize("deployment", ["compose", "k8s base"])
def test_a_client_cannot_reach_metrics_by_claiming_an_allowed_address(tmp_path: Path, deployment: str) -> None:
    # given the production server with a deployment's FORWARDED_ALLOW_IPS and /metrics allowed from INTERNAL only
    env = {"FORWARDED_ALLOW_IPS": shipped_values()[deployment], "METRICS_ALLOWED_CIDRS": INTERNAL}
    with ServeProcess(log_path=tmp_path / "serve.log", env=env) as server:
        # when a client (127.0.0.3: neither the proxy nor in INTERNAL) claims an internal address / then refused
        assert _metrics_status(server, "10.99.0.7", source="127.0.0.3") == 403
        assert _metrics_status(server, "10.99.0.7, 10.99.0.8", source="127.0.0.3") == 403


def test_behind_a_trusted_proxy_the_client_is_the_address_the_proxy_saw(tmp_path: Path) -> None:
    # given the server trusting its proxy (here 127.0.0.1, as with a local nginx)
    env = {"FORWARDED_ALLOW_IPS": "127.0.0.1", "METRICS_ALLOWED_CIDRS": INTERNAL}
    with ServeProcess(log_path=tmp_path / "serve.log", env=env) as server:
        # when the proxy appends the address it saw after the one a client sent / then that address counts
        assert _metrics_status(server, "10.99.0.7, 203.0.113.5") == 403
        # and a client the proxy saw in INTERNAL is allowed (the header is honoured from the trusted proxy)
        assert _metrics_status(server, "203.0.113.5, 10.99.0.7") == 200
