"""Django admin for the registry: pages render for staff, keys stay write-only, actions call services."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from backends.mock_vllm import MockServer
from backends.models import Backend
from tests.factories import backend_create, model_create, pool_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(admin_client: Client) -> Client:
    return admin_client


def test_changelists_and_change_pages_render(staff: Client) -> None:
    pool = pool_create(name="gpu-a")
    backend = backend_create(
        pool=pool, name="node-1", api_key="sk-secret-backend-key", status="unhealthy", last_error="unreachable: boom"
    )
    model = model_create(pool=pool, name="llama", aliases=["llama-latest"])
    for url in (
        reverse("admin:backends_gpupool_changelist"),
        reverse("admin:backends_gpupool_change", args=[pool.pk]),
        reverse("admin:backends_backend_changelist"),
        reverse("admin:backends_backend_change", args=[backend.pk]),
        reverse("admin:backends_servedmodel_changelist"),
        reverse("admin:backends_servedmodel_change", args=[model.pk]),
        reverse("admin:backends_backend_changelist") + "?status__exact=unhealthy&pool__id__exact=" + str(pool.pk),
        reverse("admin:backends_backend_changelist") + "?q=node",
    ):
        response = staff.get(url)
        assert response.status_code == 200, url
        assert b"sk-secret-backend-key" not in response.content, f"API key leaked on {url}"
    listing = staff.get(reverse("admin:backends_backend_changelist")).content.decode()
    assert "Unhealthy" in listing and "#cf222e" in listing  # coloured status


def test_api_key_is_write_only_and_kept_when_blank(staff: Client) -> None:
    backend = backend_create(api_key="sk-old")
    url = reverse("admin:backends_backend_change", args=[backend.pk])
    form = {
        "pool": backend.pool_id,
        "name": backend.name,
        "base_url": "http://gpu-1:8000/v1/",
        "state": "enabled",
        "api_key": "",
        "weight": 2,
        "max_concurrent_requests": 0,
        "connect_timeout_s": 5,
        "read_timeout_s": 60,
    }
    assert staff.post(url, form).status_code == 302
    backend.refresh_from_db()
    assert backend.api_key == "sk-old" and backend.weight == 2
    assert backend.base_url == "http://gpu-1:8000"  # normalised
    assert staff.post(url, {**form, "api_key": "sk-new"}).status_code == 302
    backend.refresh_from_db()
    assert backend.api_key == "sk-new"
    assert staff.post(url, {**form, "clear_api_key": "on"}).status_code == 302
    backend.refresh_from_db()
    assert backend.api_key == ""


def test_invalid_base_url_is_rejected(staff: Client) -> None:
    pool = pool_create()
    response = staff.post(
        reverse("admin:backends_backend_add"),
        {
            "pool": pool.pk,
            "name": "x",
            "base_url": "ftp://nope",
            "state": "enabled",
            "weight": 1,
            "max_concurrent_requests": 0,
            "connect_timeout_s": 5,
            "read_timeout_s": 60,
        },
    )
    assert response.status_code == 200 and not Backend.objects.filter(name="x").exists()


def test_alias_collision_is_rejected(staff: Client) -> None:
    pool = pool_create()
    model_create(pool=pool, name="llama")
    response = staff.post(
        reverse("admin:backends_servedmodel_add"),
        {
            "name": "other",
            "served_name": "",
            "aliases": "llama",
            "kind": "chat",
            "pool": pool.pk,
            "enabled": "on",
            "fallbacks-TOTAL_FORMS": 0,
            "fallbacks-INITIAL_FORMS": 0,
        },
    )
    assert response.status_code == 200
    assert "already used by model" in response.content.decode()


def test_check_health_action_stores_result(staff: Client) -> None:
    with MockServer(models=["served-chat"]) as mock:
        pool = pool_create()
        backend = backend_create(pool=pool, base_url=mock.url)
        model_create(pool=pool, served_name="served-chat")
        response = staff.post(
            reverse("admin:backends_backend_changelist"),
            {"action": "check_health", "_selected_action": [backend.pk]},
            follow=True,
        )
    assert response.status_code == 200
    assert "1 healthy" in response.content.decode()
    backend.refresh_from_db()
    assert backend.status == "healthy" and backend.last_checked_at is not None


def test_drain_and_undrain_actions(staff: Client) -> None:
    backend = backend_create()
    url = reverse("admin:backends_backend_changelist")
    staff.post(url, {"action": "drain", "_selected_action": [backend.pk]})
    backend.refresh_from_db()
    assert backend.state == "draining"
    staff.post(url, {"action": "undrain", "_selected_action": [backend.pk]})
    backend.refresh_from_db()
    assert backend.state == "enabled"


def test_admin_requires_login(client: Client) -> None:
    response = client.get(reverse("admin:backends_backend_changelist"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
