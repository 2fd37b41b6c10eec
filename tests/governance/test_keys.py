"""API key lifecycle: shown once, stored hashed, model access enforced, revocation reaches every process."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from backends.mock_vllm import MockServer, MockVLLM
from governance.models import ApiKey, key_hash
from governance.services import api_key_create, api_key_revoke
from governance.snapshot import KeySnap, KeySnapshot
from routing.gateway import Gateway
from routing.registry import RegistryCache
from tests.conftest import MASTER_KEY, usage_events
from tests.factories import backend_create, model_create, pool_create, registry_snap
from tests.live import PlatformProcess

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _gateway_with_keys(make_gateway: Callable[..., Gateway], mock: MockVLLM, *keys: tuple[str, KeySnap]) -> Gateway:
    gateway = make_gateway(registry=registry_snap(), transport=httpx.ASGITransport(app=mock))
    gateway.keys = RegistryCache.static(KeySnapshot(version=1, by_hash={key_hash(s): k for s, k in keys}))
    return gateway


def _snap(name: str = "team-a", **fields: object) -> KeySnap:
    values: dict[str, object] = {
        "id": 1,
        "name": name,
        "allowed_models": None,
        "expires_at": None,
        "rpm_limit": None,
        "tpm_limit": None,
        "daily_token_budget": None,
    }
    values.update(fields)
    return KeySnap(**values)  # type: ignore[arg-type]


@pytest.mark.django_db
def test_command_prints_secret_alone_on_last_line_and_stores_only_a_hash() -> None:
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "create_api_key",
        "--name",
        "team-a",
        "--models",
        "chat-model",
        "--rpm",
        "60",
        "--tpm",
        "1000",
        "--expires",
        "30d",
        stdout=out,
        stderr=err,
    )
    secret = out.getvalue().strip().splitlines()[-1]
    assert secret.startswith("sk-llm-") and len(secret) > 40
    key = ApiKey.objects.get(name="team-a")
    assert key.key_hash == key_hash(secret) and secret not in key.key_hash
    assert key.prefix == secret[:12] and key.allowed_models == ["chat-model"]
    assert (key.rpm_limit, key.tpm_limit) == (60, 1000) and key.expires_at is not None
    assert key.expires_at > timezone.now() + timedelta(days=29)
    # no column holds the secret
    assert all(secret not in str(value) for value in ApiKey.objects.values().get().values())


@pytest.mark.django_db
def test_command_reads_a_naive_expiry_as_utc() -> None:
    # given an ISO date-time without an offset
    # when the command creates the key
    call_command(
        "create_api_key",
        "--name",
        "team-b",
        "--expires",
        "2031-05-06T07:08:09",
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    # then the expiry is that instant in UTC (it raised AttributeError on `timezone.UTC` before)
    expires_at = ApiKey.objects.get(name="team-b").expires_at
    assert expires_at == datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


@pytest.mark.django_db
def test_admin_shows_secret_once(admin_client: Client) -> None:
    response = admin_client.post(
        reverse("admin:governance_apikey_add"),
        {
            "name": "web",
            "allowed_models": "[]",
            "enabled": "on",
            "priority_default": "standard",
            "priority_max": "standard",
            "queue_weight": "1",
        },
    )
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    secret = response.context["secret"]
    assert secret.startswith("sk-llm-") and secret in response.content.decode()
    key = ApiKey.objects.get(name="web")
    assert key.key_hash == key_hash(secret)
    for url in (
        reverse("admin:governance_apikey_changelist"),
        reverse("admin:governance_apikey_change", args=[key.pk]),
    ):
        assert secret not in admin_client.get(url).content.decode()


async def test_client_key_works_and_allowed_models_are_enforced(make_gateway, mock_vllm) -> None:
    gateway = _gateway_with_keys(make_gateway, mock_vllm, ("sk-a", _snap(allowed_models=frozenset({"chat-model"}))))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway), base_url="http://r", headers={"Authorization": "Bearer sk-a"}
    ) as client:
        assert (await client.post("/v1/chat/completions", json={"model": "chat-model", **CHAT})).status_code == 200
        denied = await client.post("/v1/completions", json={"model": "text-model", "prompt": "x"})
        assert denied.status_code == 404 and denied.json()["error"]["code"] == "model_not_found"
        listed = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in listed] == ["chat-model"]
        assert (await client.get("/v1/models/text-model")).status_code == 404
        bad = await client.get("/v1/models", headers={"Authorization": "Bearer sk-unknown"})
        assert bad.status_code == 401
    assert usage_events(gateway)[0].principal == "team-a" and usage_events(gateway)[0].key_id == 1


async def test_expired_key_is_rejected(make_gateway, mock_vllm) -> None:
    gateway = _gateway_with_keys(make_gateway, mock_vllm, ("sk-old", _snap(expires_at=time.time() - 1)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://r") as client:
        response = await client.get("/v1/models", headers={"Authorization": "Bearer sk-old"})
    assert response.status_code == 401 and "expired" in response.json()["error"]["message"]


@pytest.mark.django_db(transaction=True)
def test_revocation_reaches_two_processes_within_two_seconds() -> None:
    with MockServer(models=["served-chat"]) as mock:
        pool = pool_create()
        backend_create(pool=pool, base_url=mock.url)
        model_create(pool=pool, name="chat-model", served_name="served-chat")
        key, secret = api_key_create(name="revoke-me")
        with PlatformProcess(master_key=MASTER_KEY) as a, PlatformProcess(master_key=MASTER_KEY) as b:

            def status(p: PlatformProcess) -> int:
                return httpx.get(f"{p.url}/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code

            assert status(a) == status(b) == 200
            api_key_revoke(key=key)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and (status(a), status(b)) != (401, 401):
                time.sleep(0.05)
            assert (status(a), status(b)) == (401, 401)
            # the master key keeps working
            assert httpx.get(f"{a.url}/v1/models", headers={"Authorization": f"Bearer {MASTER_KEY}"}).status_code == 200


@pytest.mark.django_db
def test_management_api_creates_rotates_revokes_and_validates_keys() -> None:
    from rest_framework.test import APIClient

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    created = api.post("/api/keys/", {"name": "svc", "allowed_models": ["chat-model"], "rpm_limit": 10}, format="json")
    assert created.status_code == 201, created.json()
    secret = created.json()["secret"]
    key = ApiKey.objects.get(name="svc")
    assert key.key_hash == key_hash(secret) and "no-store" in created["Cache-Control"]
    listed = api.get("/api/keys/").json()
    assert secret not in str(listed) and "key_hash" not in str(listed) and listed[0]["prefix"] == secret[:12]
    rotated = api.post("/api/keys/svc/rotate/").json()["secret"]
    key.refresh_from_db()
    assert rotated != secret and key.key_hash == key_hash(rotated)
    assert api.post("/api/keys/svc/revoke/").json()["enabled"] is False
    # the API rejects what admin rejects
    assert api.post("/api/keys/", {"name": "svc"}, format="json").status_code == 400  # duplicate name
    assert api.post("/api/keys/", {"name": "x", "rpm_limit": 0}, format="json").status_code == 400
    assert api.post("/api/keys/", {"name": "y", "allowed_models": "all"}, format="json").status_code == 400
    assert APIClient().get("/api/keys/").status_code == 401
