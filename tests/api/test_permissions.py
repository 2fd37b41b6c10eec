"""Management API permissions: the master key may do everything; a staff session needs Django's model permission
for each action (view for reads, add/change/delete for writes, change for the custom write actions), as in admin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

from backends.checks.models import CheckRun, RunTrigger
from governance.models import ApiKey
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class Case:
    """One management API call and the model permission it needs."""

    method: str
    url: str
    perm: str  # "<app_label>.<codename>"
    ok: int  # the answer with the permission
    data: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.url}"


CASES = [
    # pools
    Case("get", "/api/pools/", "backends.view_gpupool", 200),
    Case("get", "/api/pools/p1/", "backends.view_gpupool", 200),
    Case("post", "/api/pools/", "backends.add_gpupool", 201, {"name": "p-new"}),
    Case("patch", "/api/pools/p1/", "backends.change_gpupool", 200, {"description": "x"}),
    Case("delete", "/api/pools/p-empty/", "backends.delete_gpupool", 204),
    # backends, with their custom actions
    Case("get", "/api/backends/", "backends.view_backend", 200),
    Case("get", "/api/backends/b1/", "backends.view_backend", 200),
    Case("post", "/api/backends/", "backends.add_backend", 201, {"pool": "p1", "name": "b2", "base_url": "http://h"}),
    Case("patch", "/api/backends/b1/", "backends.change_backend", 200, {"weight": 2}),
    Case("delete", "/api/backends/b1/", "backends.delete_backend", 204),
    Case("post", "/api/backends/b1/probe/", "backends.change_backend", 200),
    Case("post", "/api/backends/b1/drain/", "backends.change_backend", 200),
    Case("post", "/api/backends/b1/undrain/", "backends.change_backend", 200),
    # models
    Case("get", "/api/models/", "backends.view_servedmodel", 200),
    Case("get", "/api/models/m1/", "backends.view_servedmodel", 200),
    Case("post", "/api/models/", "backends.add_servedmodel", 201, {"name": "m2", "pool": "p1"}),
    Case("patch", "/api/models/m1/", "backends.change_servedmodel", 200, {"enabled": False}),
    Case("delete", "/api/models/m1/", "backends.delete_servedmodel", 204),
    # check runs
    Case("get", "/api/check-runs/", "backends.view_checkrun", 200),
    Case("get", "/api/check-runs/{run}/", "backends.view_checkrun", 200),
    Case("get", "/api/check-runs/{run}/report/", "backends.view_checkrun", 200),
    Case("post", "/api/check-runs/", "backends.add_checkrun", 202, {}),
    # API keys, with rotate and revoke
    Case("get", "/api/keys/", "governance.view_apikey", 200),
    Case("get", "/api/keys/k1/", "governance.view_apikey", 200),
    Case("post", "/api/keys/", "governance.add_apikey", 201, {"name": "k2"}),
    Case("patch", "/api/keys/k1/", "governance.change_apikey", 200, {"rpm_limit": 5}),
    Case("delete", "/api/keys/k1/", "governance.delete_apikey", 204),
    Case("post", "/api/keys/k1/rotate/", "governance.change_apikey", 200),
    Case("post", "/api/keys/k1/revoke/", "governance.change_apikey", 200),
    # usage
    Case("get", "/api/usage/", "governance.view_usagerecord", 200),
]


@pytest.fixture
def rows(settings: Any) -> dict[str, Any]:
    """Pool p1 with backend b1 (probes fail fast) and model m1, an empty pool, key k1 and one check run."""
    settings.ROUTER_PROBE_TIMEOUT_S = 1.0
    pool = pool_create(name="p1")
    backend_create(pool=pool, name="b1", base_url="http://127.0.0.1:9")
    model_create(pool=pool, name="m1")
    pool_create(name="p-empty")
    ApiKey.objects.create(name="k1", prefix="sk-llm-k1", key_hash="0" * 64)
    run = CheckRun.objects.create(trigger=RunTrigger.API, triggered_by="test")
    return {"run": run.pk}


def _session(django_user_model: Any, *, staff: bool, perms: list[str]) -> APIClient:
    user = django_user_model.objects.create_user("operator", password="pw-0123456789", is_staff=staff)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    client = APIClient()
    client.force_login(user)
    return client


def _call(client: APIClient, case: Case, rows: dict[str, Any]) -> Any:
    return getattr(client, case.method)(case.url.format(**rows), case.data, format="json")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_staff_lacking_the_permission_is_refused(case: Case, rows: dict[str, Any], django_user_model: Any) -> None:
    # given a staff user holding every permission of the API except the one this call needs
    others = sorted({c.perm for c in CASES} - {case.perm})
    client = _session(django_user_model, staff=True, perms=others)
    # when it makes the call, then it is refused
    assert _call(client, case, rows).status_code == 403


@pytest.mark.parametrize("case", CASES, ids=str)
def test_staff_with_the_model_permission_is_allowed(case: Case, rows: dict[str, Any], django_user_model: Any) -> None:
    # given a staff user holding exactly the permission this call needs
    client = _session(django_user_model, staff=True, perms=[case.perm])
    # when it makes the call, then it succeeds
    answer = _call(client, case, rows)
    assert answer.status_code == case.ok, answer.content[:300]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_permission_without_staff_is_refused(case: Case, rows: dict[str, Any], django_user_model: Any) -> None:
    # given a user who holds the permission but is not staff (admin would not let them in either)
    client = _session(django_user_model, staff=False, perms=[case.perm])
    # then the call is refused
    assert _call(client, case, rows).status_code == 403


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_master_key_may_do_everything(case: Case, rows: dict[str, Any]) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    answer = _call(client, case, rows)
    assert answer.status_code == case.ok, answer.content[:300]


def test_superuser_session_may_do_everything(rows: dict[str, Any], admin_client: Any) -> None:
    # a superuser has every permission, as in admin
    assert admin_client.get("/api/keys/").status_code == 200
    assert admin_client.post("/api/keys/", {"name": "k-admin"}, content_type="application/json").status_code == 201


def test_no_credentials_is_401_with_bearer_challenge(rows: dict[str, Any]) -> None:
    answer = APIClient().get("/api/pools/")
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
