"""The registry's management API: master key or staff session; it rejects what admin rejects."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.test import APIClient

from backends.models import Backend, ServedModel
from backends.selectors import registry_version_get
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, pool_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    return client


def test_requires_master_key_or_staff(client: Client, admin_client: Client) -> None:
    assert client.get("/api/pools/").status_code == 401
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION="Bearer nope")
    assert wrong.get("/api/pools/").status_code == 401
    assert admin_client.get("/api/pools/").status_code == 200


def test_crud_pool_backend_model(api: APIClient, django_capture_on_commit_callbacks) -> None:
    before = registry_version_get()
    with django_capture_on_commit_callbacks(execute=True):
        assert api.post("/api/pools/", {"name": "gpu-a"}, format="json").status_code == 201
        assert api.post("/api/pools/", {"name": "gpu-b"}, format="json").status_code == 201
        created = api.post(
            "/api/backends/",
            {"pool": "gpu-a", "name": "node-1", "base_url": "http://vllm-0.vllm:8000/v1", "api_key": "sk-x"},
            format="json",
        )
        assert created.status_code == 201, created.json()
        assert "api_key" not in created.json() and created.json()["has_api_key"] is True
        assert created.json()["base_url"] == "http://vllm-0.vllm:8000"
        model = api.post(
            "/api/models/",
            {
                "name": "llama",
                "served_name": "meta/llama",
                "pool": "gpu-a",
                "fallback_pools": ["gpu-b"],
                "aliases": ["llama-latest"],
            },
            format="json",
        )
        assert model.status_code == 201, model.json()
    assert registry_version_get() > before
    assert api.get("/api/models/llama/").json()["fallback_pools"] == ["gpu-b"]
    assert api.patch("/api/backends/node-1/", {"weight": 3}, format="json").json()["weight"] == 3
    assert Backend.objects.get(name="node-1").api_key == "sk-x"
    assert api.post("/api/backends/node-1/drain/").json()["state"] == "draining"
    assert api.delete("/api/models/llama/").status_code == 204
    assert not ServedModel.objects.exists()


def test_rejects_what_admin_rejects(api: APIClient) -> None:
    pool = pool_create(name="gpu-a")
    backend_create(pool=pool, name="node-1")
    ServedModel.objects.create(name="llama", pool=pool)
    bad_url = api.post("/api/backends/", {"pool": "gpu-a", "name": "x", "base_url": "ftp://x"}, format="json")
    assert bad_url.status_code == 400 and "base_url" in bad_url.json()
    bad_name = api.post("/api/pools/", {"name": "has space"}, format="json")
    assert bad_name.status_code == 400 and "name" in bad_name.json()
    alias_clash = api.post("/api/models/", {"name": "other", "pool": "gpu-a", "aliases": ["llama"]}, format="json")
    assert alias_clash.status_code == 400 and "aliases" in alias_clash.json()
    own_fallback = api.post("/api/models/", {"name": "m2", "pool": "gpu-a", "fallback_pools": ["gpu-a"]}, format="json")
    assert own_fallback.status_code == 400
    unknown_pool = api.post("/api/backends/", {"pool": "nope", "name": "y", "base_url": "http://h"}, format="json")
    assert unknown_pool.status_code == 400 and "pool" in unknown_pool.json()
    bad_strategy = api.post("/api/pools/", {"name": "p", "routing_strategy": "random"}, format="json")
    assert bad_strategy.status_code == 400
