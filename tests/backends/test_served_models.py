"""Models no backend serves: the environment's registration reconciles, the probe marks, the router hides them."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from backends.checks.models import CheckCase
from backends.checks.selectors import check_targets_build
from backends.mock_vllm import MockServer, MockVLLM
from backends.models import Backend, GpuPool, ServedModel
from backends.selectors import registry_snapshot_build, registry_version_get
from backends.services import backend_probe, backend_probe_all, registry_vllm_register
from routing.gateway import Gateway
from tests.conftest import AUTH, MASTER_KEY
from tests.factories import backend_create, model_create, pool_create

pytestmark = pytest.mark.django_db


def test_registering_from_the_environment_again_removes_what_it_no_longer_names(
    monkeypatch: pytest.MonkeyPatch, settings: Any, tmp_path: Any
) -> None:
    # given an earlier `VLLM_BACKEND_URL=u1,u2 VLLM_MODEL_NAME=a make run`, and an operator's own pool
    settings.LOCAL_DIR = tmp_path
    monkeypatch.setenv("VLLM_BACKEND_URL", "http://gpu-1:8000,http://gpu-2:8000")
    monkeypatch.setenv("VLLM_MODEL_NAME", "a")
    call_command("setup_platform", stdout=io.StringIO())
    other = pool_create(name="other")
    model_create(pool=other, name="kept")
    # when it runs again with one URL and model b
    monkeypatch.setenv("VLLM_BACKEND_URL", "http://gpu-1:8000")
    monkeypatch.setenv("VLLM_MODEL_NAME", "b")
    call_command("setup_platform", stdout=io.StringIO())
    # then the vllm pool is what the environment says now, and nothing else was touched
    pool = GpuPool.objects.get(name="vllm")
    assert [m.name for m in ServedModel.objects.filter(pool=pool)] == ["b"]
    assert [(b.name, b.base_url) for b in Backend.objects.filter(pool=pool)] == [("vllm-1", "http://gpu-1:8000")]
    assert ServedModel.objects.filter(name="kept", pool=other).exists()
    assert "a" not in registry_snapshot_build().models


def test_an_operator_backend_in_the_environment_pool_is_kept() -> None:
    registry_vllm_register(urls=["http://gpu-1:8000"], model_name="a")
    backend_create(pool=GpuPool.objects.get(name="vllm"), name="vllm-extra", base_url="http://gpu-9:8000")
    registry_vllm_register(urls=["http://gpu-1:8000"], model_name="a")
    assert sorted(Backend.objects.values_list("name", flat=True)) == ["vllm-1", "vllm-extra"]


def test_probe_marks_a_model_no_backend_lists_and_clears_the_mark_when_it_is_served_again() -> None:
    # given a pool whose server lists b, but the registry also has a (left from an earlier configuration)
    with MockServer(models=["b"]) as server:
        pool = pool_create(name="vllm")
        backend = backend_create(pool=pool, name="vllm-1", base_url=server.url)
        stale = model_create(pool=pool, name="a")
        current = model_create(pool=pool, name="b")
        before = registry_version_get()
        # when the periodic probe runs
        backend_probe_all()
        # then a is marked with the reason, b is served, the backend stays healthy, and the routers reload
        stale.refresh_from_db()
        current.refresh_from_db()
        backend.refresh_from_db()
        assert "no backend of pool 'vllm' lists 'a'" in stale.unavailable_reason
        assert current.unavailable_reason == ""
        assert backend.status == "healthy"
        assert registry_version_get() > before
        snapshot = registry_snapshot_build()
        assert [m.name for m in snapshot.listed_models] == ["b"]
        assert "a" not in snapshot.models and snapshot.unavailable["a"].unavailable_reason
        # and when the server lists a again, the next probe clears the mark
        server.config.models = ["a", "b"]
        backend_probe_all()
    stale.refresh_from_db()
    assert stale.unavailable_reason == ""
    assert "a" in registry_snapshot_build().models


def test_a_probe_of_some_backends_of_a_pool_does_not_mark_a_model() -> None:
    # given a pool of two backends of which only one is probed (admin's "Check health now" on one row)
    with MockServer(models=["other"]) as server:
        pool = pool_create()
        probed = backend_create(pool=pool, base_url=server.url)
        backend_create(pool=pool, base_url="http://127.0.0.1:9")
        model = model_create(pool=pool, served_name="served-chat")
        backend_probe(backend=probed)
    # then the evidence is incomplete: the model stays served, the probed backend lacks it and is unhealthy
    model.refresh_from_db()
    probed.refresh_from_db()
    assert model.unavailable_reason == ""
    assert probed.status == "unhealthy" and "served-chat" in probed.last_error


def test_the_gateway_neither_lists_nor_routes_an_unavailable_model(make_gateway: Callable[..., Gateway]) -> None:
    # given a registry in which the probe marked model a as listed by no backend
    pool = pool_create(name="p1")
    backend_create(pool=pool, name="b1", base_url="http://mock-a", status="healthy")
    model_create(pool=pool, name="a", served_name="a", unavailable_reason="no backend of pool 'p1' lists 'a'")
    model_create(pool=pool, name="b", served_name="b")
    upstream = MockVLLM(models=["a", "b"])
    gateway = make_gateway(registry=registry_snapshot_build(), transport=httpx.ASGITransport(app=upstream))

    async def calls() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router") as client:
            listing = await client.get("/v1/models", headers=AUTH)
            chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
            routed = await client.post("/v1/chat/completions", headers=AUTH, json=chat)
            served = await client.post("/v1/chat/completions", headers=AUTH, json={**chat, "model": "b"})
            return listing, routed, served

    listing, routed, served = asyncio.run(calls())
    # then /v1/models lists only b, a request for a gets an OpenAI-shaped error and no backend sees it
    assert [m["id"] for m in listing.json()["data"]] == ["b"]
    assert routed.status_code in {404, 503} and routed.json()["error"]["param"] == "model"
    assert served.status_code == 200
    assert upstream.stats.total_requests == 1


def test_admin_and_api_show_why_a_model_is_not_served(admin_client: Any) -> None:
    model_create(name="a", unavailable_reason="no backend of pool 'p' lists 'a' at /v1/models")
    page = admin_client.get("/admin/backends/servedmodel/").content.decode()
    assert "not served" in page and "lists &#x27;a&#x27; at /v1/models" in page
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    data = api.get("/api/models/a/").json()
    assert data["unavailable_reason"].startswith("no backend")
    # read-only: the probe writes it, not the API
    api.patch("/api/models/a/", {"unavailable_reason": ""}, format="json")
    assert ServedModel.objects.get(name="a").unavailable_reason.startswith("no backend")


def test_checks_skip_a_model_no_backend_serves(db: None) -> None:
    CheckCase.objects.update(enabled=False)
    CheckCase.objects.create(name="c", messages=[{"role": "user", "content": "hi"}], expected_text="x")
    pool = pool_create()
    backend_create(pool=pool)
    model_create(pool=pool, name="served")
    model_create(pool=pool, name="gone", unavailable_reason="no backend lists it")
    assert {t.model_name for t in check_targets_build()} == {"served"}
