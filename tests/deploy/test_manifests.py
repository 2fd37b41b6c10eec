"""Semantic checks of deploy/ beyond schema validation (scripts/validate_deploy.sh): the Kubernetes overlays, the
compose file, the Dockerfile and the registry files agree with each other and with the way `make run` starts."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from backends.registry_io import registry_import, registry_yaml_load
from llm_platform.serve import BoundedHttpToolsProtocol, ServeOptions
from tests.live import ROOT

DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "gpu-production")
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize) to render")


def render(overlay: str) -> list[dict[str, Any]]:
    """The resources of one overlay, as `kubectl kustomize` renders them."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The resource of that kind and name (names may carry kustomize's hash suffix for generated ones)."""
    pattern = re.compile(rf"{re.escape(name)}(-[a-z0-9]{{10}})?")
    found = [r for r in resources if r["kind"] == kind and pattern.fullmatch(r["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Init containers and containers of a workload's pod template."""
    spec = workload["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels / matchExpressions with In) selects these labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    """Each overlay's rendered resources."""
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl (kustomize) to render")
    return request.param, render(request.param)


def test_web_probes_drain_and_scaling(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    web = one(resources, "Deployment", "llm-web")
    pod = web["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["web"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "replicas" not in web["spec"]  # the HPA owns it
    assert web["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # the pod may take preStop + GRACEFUL_TIMEOUT_S before it is killed
    config = one(resources, "ConfigMap", "platform-config")["data"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + int(config["GRACEFUL_TIMEOUT_S"])
    assert pod["spec"]["initContainers"][0]["args"] == ["wait-migrations"]
    hpa = one(resources, "HorizontalPodAutoscaler", "llm-web")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-web"}
    pdb = one(resources, "PodDisruptionBudget", "llm-web")
    assert matches(pdb["spec"]["selector"], pod["metadata"]["labels"])
    service = one(resources, "Service", "llm-web")
    assert matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])


def test_one_beat_worker_and_setup_job(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    beat = one(resources, "Deployment", "llm-beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    assert one(resources, "Deployment", "llm-worker")["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker"]
    job = one(resources, "Job", "llm-setup")
    (setup,) = job["spec"]["template"]["spec"]["containers"]
    assert setup["args"] == ["migrate"]
    registry_file = next(e["value"] for e in setup["env"] if e["name"] == "REGISTRY_FILE")
    mount = next(m for m in setup["volumeMounts"] if registry_file.startswith(m["mountPath"]))
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == one(resources, "ConfigMap", "platform-registry")["metadata"]["name"]


def test_every_platform_pod_runs_the_platform_image_as_non_root(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    platform = [
        r
        for r in resources
        if r["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "llm-platform"
        and r["kind"] in {"Deployment", "Job"}
    ]
    assert len(platform) == 4
    images = {c["image"] for w in platform for c in containers(w)}
    assert len(images) == 1 and "llm-platform" in images.pop()
    for workload in platform:
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in containers(workload):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_vllm_pools_match_the_registry_and_only_the_platform_reaches_them(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, resources = overlay
    pools = [
        r
        for r in resources
        if r["kind"] == "StatefulSet" and r["metadata"]["labels"]["app.kubernetes.io/name"] == "vllm"
    ]
    assert pools
    registry = yaml.safe_load(one(resources, "ConfigMap", "platform-registry")["data"]["registry.yaml"])
    urls = {b["base_url"] for p in registry["pools"] for b in p["backends"]}
    served = set()
    for sts in pools:
        service = one(resources, "Service", sts["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per vLLM server
        pod = sts["spec"]["template"]
        assert matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
        served |= {
            f"http://{sts['metadata']['name']}-{i}.{service['metadata']['name']}:8000"
            for i in range(sts["spec"]["replicas"])
        }
        (vllm,) = pod["spec"]["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert vllm[probe]["httpGet"]["path"] == "/health"
        if name == "gpu-production":
            assert vllm["resources"]["limits"]["nvidia.com/gpu"] == vllm["resources"]["requests"]["nvidia.com/gpu"]
            assert {"name": "model-cache", "mountPath": "/models"} in vllm["volumeMounts"]
            assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "model-cache"
    # every registry backend is a vLLM server of the overlay, and every server is in the registry
    assert urls == served
    # the NetworkPolicy selects every vLLM pod and admits web and worker only
    (policy,) = [r for r in resources if r["kind"] == "NetworkPolicy"]
    for sts in pools:
        assert matches(policy["spec"]["podSelector"], sts["spec"]["template"]["metadata"]["labels"])
    (rule,) = policy["spec"]["ingress"]
    admitted = {
        component
        for component in ("web", "worker", "beat", "setup")
        if any(
            matches(
                peer["podSelector"],
                {"app.kubernetes.io/name": "llm-platform", "app.kubernetes.io/component": component},
            )
            for peer in rule["from"]
        )
    }
    assert admitted == {"web", "worker"}
    assert all("namespaceSelector" not in peer and "ipBlock" not in peer for peer in rule["from"])


def test_secrets_hold_placeholders_only() -> None:
    for path in (DEPLOY / "k8s" / "base" / "secret.yaml", DEPLOY / "compose.env.example"):
        text = path.read_text()
        if path.suffix == ".yaml":
            values = [v for doc in yaml.safe_load_all(text) for v in doc["stringData"].values()]
        else:
            values = [line.split("=", 1)[1] for line in text.splitlines() if "=" in line and not line.startswith("#")]
        for value in values:
            assert value == "" or "CHANGE-ME" in value, f"{path.name}: {value!r} is not a placeholder"
    dev = (DEPLOY / "k8s" / "overlays" / "dev" / "secrets-dev.yaml").read_text()
    assert all(
        "dev-only" in v or v.startswith("redis://redis:")
        for doc in yaml.safe_load_all(dev)
        for v in doc["stringData"].values()
    )


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_topology() -> None:
    services = _compose()["services"]
    assert services["web"]["deploy"]["replicas"] == 2
    assert services["beat"]["deploy"]["replicas"] == 1
    for role in ("web", "worker", "beat"):
        assert services[role]["command"] == [role]
        assert services[role]["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        assert services[role]["image"] == services["setup"]["image"]  # one image for every role
    assert services["setup"]["command"] == ["migrate"]
    assert services["setup"]["environment"]["REGISTRY_FILE"] == "/app/deploy/compose/registry.yaml"
    gpu = services["vllm"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    cpu = services["vllm-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["dockerfile"] == "deploy/vllm-cpu.Dockerfile"
    # the web containers get longer than their grace period to finish streams
    grace = int(services["web"]["environment"]["GRACEFUL_TIMEOUT_S"].split(":-")[1].rstrip("}"))
    assert int(services["web"]["stop_grace_period"].rstrip("s")) > grace


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    [
        "compose/registry.yaml",
        "k8s/base/registry.yaml",
        "k8s/overlays/gpu-production/registry.yaml",
        "registry.example.yaml",
    ],
)
def test_registry_files_import(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("VLLM_API_KEY", "VLLM_A100_API_KEY", "VLLM_L40S_API_KEY"):
        monkeypatch.setenv(variable, "sk-test")
    document = registry_yaml_load(text=(DEPLOY / path).read_text())
    report = registry_import(document=document, dry_run=True, prune=False)
    assert "created" in report.format()


def test_dockerfile_runs_the_same_steps_as_make_run() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    entrypoint = (DEPLOY / "entrypoint.sh").read_text()
    serve = (ROOT / "scripts" / "serve.sh").read_text()
    run = re.sub(r"\s+", " ", (ROOT / "scripts" / "run_platform.py").read_text())
    makefile = (ROOT / "Makefile").read_text()
    # the same requirements file as the virtualenv of `make`
    assert "pip install -r /tmp/requirements.txt" in dockerfile and "requirements.txt" in makefile
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS builder$", dockerfile, re.M)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert re.search(r"^USER 10001", dockerfile, re.M) and "HEALTHCHECK" in dockerfile
    assert 'ENTRYPOINT ["/app/deploy/entrypoint.sh"]' in dockerfile
    # the server: `make run` and serve.sh both run llm_platform/serve.py (make run with one worker), whose workers
    # are uvicorn servers with one set of settings: the app, uvloop, httptools with bounded request heads, lifespan
    assert '"-m", "llm_platform.serve"' in run and '"--workers", "1"' in run
    for option in (
        "python -m llm_platform.serve",
        "--workers",
        "--graceful-timeout",
        "--keepalive-timeout",
        "--max-head-bytes",
        "--head-timeout",
    ):
        assert option in serve, option
    config = ServeOptions().uvicorn_config()
    assert (config.app, config.loop, config.lifespan) == ("llm_platform.asgi:application", "uvloop", "on")
    assert isinstance(config.http, type) and issubclass(config.http, BoundedHttpToolsProtocol)
    # the roles: migrate and Celery as `make run` runs them
    assert '"manage.py", "migrate", "--noinput"' in run and "python manage.py migrate --noinput" in entrypoint
    assert '"celery", "-A", "llm_platform", "worker"' in run
    assert "python -m celery -A llm_platform worker" in entrypoint
    assert "python -m celery -A llm_platform beat" in entrypoint
    for role in ("web", "worker", "beat", "migrate", "import-registry", "wait-migrations", "healthcheck"):
        assert re.search(rf"^  {role}\)$", entrypoint, re.M), role
