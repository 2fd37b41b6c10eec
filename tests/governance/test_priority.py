"""Priority classes of API keys: parsing and clamping, the key's default, ceiling and weight in admin, the API, the
command and the hot path's key snapshot; batch work runs in the lowest class."""

from __future__ import annotations

import io

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from core.errors import APIError
from governance.models import ApiKey
from governance.priority import Priority, priority_clamp, priority_parse, priority_requested
from governance.selectors import key_snapshot_build
from governance.services import api_key_create
from tests.conftest import MASTER_KEY


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("critical", Priority.CRITICAL),
        (" Batch ", Priority.BATCH),
        (b"standard", Priority.STANDARD),
        (b"CRITICAL", Priority.CRITICAL),
        (-1, Priority.CRITICAL),
        (0, Priority.STANDARD),
        (10, Priority.BATCH),
    ],
)
def test_a_class_is_named_or_given_as_vllms_integer(value: object, expected: Priority) -> None:
    assert priority_parse(value) is expected


@pytest.mark.parametrize("value", ["urgent", "", b"p0", 1.5, True, None, [0], {"class": "batch"}])
def test_anything_else_is_not_a_class(value: object) -> None:
    with pytest.raises(ValueError, match="critical, standard, batch"):
        priority_parse(value)


def test_a_request_runs_in_what_it_asks_for_within_the_ceiling_else_the_default() -> None:
    standard, critical, batch = Priority.STANDARD, Priority.CRITICAL, Priority.BATCH
    assert priority_clamp(None, default=batch, ceiling=standard) is batch
    assert priority_clamp(critical, default=standard, ceiling=standard) is standard  # clamped
    assert priority_clamp(batch, default=standard, ceiling=critical) is batch  # lower is always allowed
    assert priority_clamp(critical, default=standard, ceiling=critical) is critical
    assert [p.vllm for p in (critical, standard, batch)] == [-10, 0, 10]


def test_the_header_wins_over_the_body_and_the_body_field_is_removed() -> None:
    data: dict[str, object] = {"model": "m", "priority": "batch"}
    assert priority_requested(data, [(b"x-priority", b"critical")]) is Priority.CRITICAL
    assert "priority" not in data
    data = {"model": "m", "priority": 3}
    assert priority_requested(data, [(b"authorization", b"x")]) is Priority.BATCH and "priority" not in data
    assert priority_requested({"model": "m"}, []) is None
    with pytest.raises(APIError) as caught:
        priority_requested({"priority": "top"}, [])
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "priority", "invalid_priority")


@pytest.mark.django_db
def test_a_key_default_cannot_be_above_its_ceiling() -> None:
    with pytest.raises(ValidationError) as caught:
        api_key_create(name="k", priority_default="critical", priority_max="standard")
    assert "priority_default" in caught.value.message_dict
    with pytest.raises(ValidationError):
        api_key_create(name="k", queue_weight=0)
    key, _ = api_key_create(name="k", priority_default="batch", priority_max="critical", queue_weight=3)
    assert (key.priority_default, key.priority_max, key.queue_weight) == ("batch", "critical", 3)


@pytest.mark.django_db
def test_new_keys_are_standard_with_weight_one_and_the_snapshot_carries_the_fields() -> None:
    api_key_create(name="plain")
    api_key_create(name="ops", priority_default="standard", priority_max="critical", queue_weight=5)
    snaps = {k.name: k for k in key_snapshot_build().by_hash.values()}
    plain, ops = snaps["plain"], snaps["ops"]
    assert (plain.priority_default, plain.priority_max, plain.queue_weight) == (Priority.STANDARD,) * 2 + (1,)
    assert (ops.priority_default, ops.priority_max, ops.queue_weight) == (Priority.STANDARD, Priority.CRITICAL, 5)


@pytest.mark.django_db
def test_the_command_sets_class_ceiling_and_weight() -> None:
    out = io.StringIO()
    call_command(
        "create_api_key", "--name", "jobs", "--priority", "batch", "--weight", "2", stdout=out, stderr=io.StringIO()
    )
    call_command(
        "create_api_key",
        "--name",
        "pager",
        "--priority",
        "standard",
        "--max-priority",
        "critical",
        stdout=out,
        stderr=io.StringIO(),
    )
    jobs, pager = ApiKey.objects.get(name="jobs"), ApiKey.objects.get(name="pager")
    assert (jobs.priority_default, jobs.priority_max, jobs.queue_weight) == ("batch", "batch", 2)
    assert (pager.priority_default, pager.priority_max, pager.queue_weight) == ("standard", "critical", 1)


@pytest.mark.django_db
def test_the_management_api_reads_writes_and_validates_the_fields() -> None:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    created = api.post("/api/keys/", {"name": "svc", "priority_max": "critical", "queue_weight": 4}, format="json")
    assert created.status_code == 201, created.json()
    body = created.json()
    assert (body["priority_default"], body["priority_max"], body["queue_weight"]) == ("standard", "critical", 4)
    assert api.patch("/api/keys/svc/", {"priority_default": "critical"}, format="json").status_code == 200
    # the default above the ceiling, an unknown class, a weight out of range: 400, as in admin
    assert api.patch("/api/keys/svc/", {"priority_max": "batch"}, format="json").status_code == 400
    assert api.post("/api/keys/", {"name": "x", "priority_max": "urgent"}, format="json").status_code == 400
    assert api.post("/api/keys/", {"name": "y", "queue_weight": 0}, format="json").status_code == 400
    assert api.post("/api/keys/", {"name": "z", "queue_weight": 1001}, format="json").status_code == 400
    key = ApiKey.objects.get(name="svc")
    assert (key.priority_default, key.priority_max) == ("critical", "critical")


@pytest.mark.django_db
def test_admin_edits_the_fields(admin_client: Client) -> None:
    key, _ = api_key_create(name="web")
    url = reverse("admin:governance_apikey_change", args=[key.pk])
    page = admin_client.get(url).content.decode()
    assert 'name="priority_max"' in page and 'name="queue_weight"' in page
    form = {"name": "web", "allowed_models": "[]", "enabled": "on", "queue_weight": "3"}
    response = admin_client.post(url, {**form, "priority_default": "batch", "priority_max": "critical"})
    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.priority_default, key.priority_max, key.queue_weight) == ("batch", "critical", 3)
    refused = admin_client.post(url, {**form, "priority_default": "critical", "priority_max": "batch"})
    assert refused.status_code == 200 and "cannot be above" in refused.content.decode()
