"""Backend API keys that are not valid HTTP header values: rejected on save and import, harmless at run time.

A key with a non-ASCII character, a CR/LF, or the trailing newline a secret file adds must never turn requests or
probes into 500s, abort a probe batch or a check run, or end up (as part of an error message) in `last_error`.
"""

from __future__ import annotations

import httpx
import pytest
from rest_framework.test import APIClient

from backends.checks.runner import BackendTarget, CaseSpec, CheckTarget, run_checks
from backends.mock_vllm import MockServer, MockVLLM
from backends.models import Backend
from backends.registry_io import RegistryImportError, registry_import
from backends.selectors import registry_snapshot_build
from backends.services import backend_probe_all
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create

pytestmark = pytest.mark.django_db

BAD_KEYS = {
    "non-ascii": "sk-sécret-1234",
    "line break": "sk-secret\r\nX-Injected: 1",
    "inner newline": "sk-secret\n5678",
    "control character": "sk-secret\x00",
}


def _store_raw(backend: Backend, key: str) -> None:
    """Write a key the way an old row or a raw ORM update could have stored it (no validation)."""
    Backend.objects.filter(pk=backend.pk).update(api_key=key)


@pytest.mark.parametrize("key", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_api_rejects_a_key_that_is_not_a_header_value_without_echoing_it(key: str) -> None:
    # given the management API and a pool
    pool_create(name="gpu-a")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    # when a backend is created with the bad key
    response = api.post(
        "/api/backends/", {"pool": "gpu-a", "name": "b1", "base_url": "http://b1:8000", "api_key": key}, format="json"
    )
    # then it is refused, names the field, and does not repeat the secret
    assert response.status_code == 400, response.content
    assert "api_key" in response.json()
    assert "secret" not in response.content.decode()
    assert not Backend.objects.exists()


def test_api_strips_the_whitespace_a_secret_file_adds() -> None:
    pool_create(name="gpu-a")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    response = api.post(
        "/api/backends/",
        {"pool": "gpu-a", "name": "b1", "base_url": "http://b1:8000", "api_key": "sk-abc\n"},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert Backend.objects.get(name="b1").api_key == "sk-abc"


def test_admin_rejects_a_non_ascii_key(admin_client) -> None:
    # given a backend edited in admin
    backend = backend_create(name="b1", base_url="http://b1:8000")
    url = f"/admin/backends/backend/{backend.pk}/change/"
    form = {
        "pool": backend.pool_id,
        "name": "b1",
        "base_url": "http://b1:8000",
        "state": "enabled",
        "weight": 1,
        "max_concurrent_requests": 0,
        "connect_timeout_s": 5,
        "read_timeout_s": 120,
        "api_key": "sk-sécret",
    }
    # when a key with a non-ASCII character is typed
    response = admin_client.post(url, form)
    # then the form is shown again with an error and nothing is stored
    assert response.status_code == 200
    assert "printable ASCII" in response.content.decode()
    assert "sécret" not in response.content.decode()
    backend.refresh_from_db()
    assert backend.api_key == ""
    # and a key with the newline a secret file leaves is stored without it
    form["api_key"] = "sk-abc\n"
    assert admin_client.post(url, form).status_code == 302
    backend.refresh_from_db()
    assert backend.api_key == "sk-abc"


def test_import_strips_the_newline_of_a_secret_file_from_api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # given a key read from a file into the environment, trailing newline included
    monkeypatch.setenv("VLLM_TEST_KEY", "sk-from-file\r\n")
    document = {
        "pools": [{"name": "p", "backends": [{"name": "b1", "base_url": "http://b1", "api_key_env": "VLLM_TEST_KEY"}]}]
    }
    # when it is imported
    registry_import(document=document)
    # then the stored key has no newline
    assert Backend.objects.get(name="b1").api_key == "sk-from-file"


@pytest.mark.parametrize("source", ["api_key", "api_key_env"])
def test_import_rejects_a_bad_key_without_echoing_it(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_TEST_KEY", BAD_KEYS["non-ascii"])
    entry = {"name": "b1", "base_url": "http://b1"}
    entry.update({"api_key": BAD_KEYS["non-ascii"]} if source == "api_key" else {"api_key_env": "VLLM_TEST_KEY"})
    with pytest.raises(RegistryImportError) as caught:
        registry_import(document={"pools": [{"name": "p", "backends": [entry]}]})
    message = "\n".join(caught.value.errors)
    assert "field 'api_key" in message and "printable ASCII" in message
    assert "sécret" not in message and "1234" not in message
    assert not Backend.objects.exists()


def test_a_bad_key_fails_only_its_backend_in_a_probe_batch_and_is_never_written_out() -> None:
    # given three backends on one live server: a good one, and two whose stored keys are not header values
    with MockServer(models=["served-chat"]) as mock:
        pool = pool_create()
        model_create(pool=pool, served_name="served-chat")
        good = backend_create(pool=pool, name="good", base_url=mock.url, api_key="sk-fine")
        accented = backend_create(pool=pool, name="accented", base_url=mock.url)
        crlf = backend_create(pool=pool, name="crlf", base_url=mock.url)
        _store_raw(accented, BAD_KEYS["non-ascii"])
        _store_raw(crlf, BAD_KEYS["inner newline"])
        # when the periodic probe runs
        results = {r.backend: r for r in backend_probe_all()}
    # then every backend got a result, the good one is healthy, the bad ones unhealthy with a secret-free reason
    assert set(results) == {"good", "accented", "crlf"}
    assert results["good"].status == "healthy"
    for backend in (accented, crlf):
        backend.refresh_from_db()
        assert backend.status == "unhealthy"
        assert "API key" in backend.last_error and "not a valid HTTP header value" in backend.last_error
        assert "secret" not in backend.last_error and "5678" not in backend.last_error
    good.refresh_from_db()
    assert good.status == "healthy"


def test_the_routing_snapshot_never_offers_a_backend_whose_key_is_not_a_header_value() -> None:
    # given a backend whose stored key cannot be sent, and one that is fine
    pool = pool_create(name="p")
    bad = backend_create(pool=pool, name="bad", status="healthy")
    backend_create(pool=pool, name="fine", status="healthy", api_key="sk-fine")
    _store_raw(bad, BAD_KEYS["line break"])
    # when the router's snapshot is built
    snapshot = registry_snapshot_build()
    # then the bad backend is not usable (requests go to the others, or get a 503, never a 500)
    backends = {b.name: b for b in snapshot.pools["p"].backends}
    assert not backends["bad"].usable
    assert backends["fine"].usable


async def test_a_check_run_fails_only_the_backend_with_a_bad_key_and_names_no_secret() -> None:
    # given check targets on two backends, one with a key that is not a header value
    transport = httpx.ASGITransport(app=MockVLLM(models=["served"]))
    case = CaseSpec(
        id=None, name="c", messages=[{"role": "user", "content": "capital of France?"}], expected_text="Paris"
    )
    good = BackendTarget(id=1, name="good", base_url="http://good", api_key="sk-fine")
    targets = [CheckTarget(good, None, "m", "served", case)]
    for index, key in enumerate(BAD_KEYS.values(), start=2):
        bad = BackendTarget(id=index, name=f"bad{index}", base_url=f"http://bad{index}", api_key=key)
        targets.append(CheckTarget(bad, None, "m", "served", case))
    # when the run executes
    outcomes = await run_checks(targets, transport=transport)
    # then the good backend passes and each bad one fails with a reason that holds no part of its key
    assert len(outcomes) == len(targets)
    assert outcomes[0].passed
    for outcome in outcomes[1:]:
        assert not outcome.passed
        assert "API key" in outcome.error and "secret" not in outcome.error and "Injected" not in outcome.error


def test_migration_0006_strips_stored_keys_and_removes_them_from_error_texts() -> None:
    # given a key stored with a secret file's newline, which an earlier probe and check run quoted in errors
    import importlib

    from django.apps import apps

    from backends.checks.models import CheckResult, CheckRun

    migration = importlib.import_module("backends.migrations.0006_backend_api_key_model_unavailable_reason")
    backend = backend_create(name="b1")
    leak = "unreachable: Illegal header value b'Bearer sk-leaked-42\\n'"
    Backend.objects.filter(pk=backend.pk).update(api_key="sk-leaked-42\n", last_error=leak)
    run = CheckRun.objects.create(trigger="command")
    CheckResult.objects.create(run=run, backend=backend, backend_name="b1", case_name="c", error=leak)
    # when the migration's data step runs
    migration.strip_api_keys(apps, None)
    # then the key is stripped and no error text holds it any more
    backend.refresh_from_db()
    assert backend.api_key == "sk-leaked-42"
    assert "sk-leaked-42" not in backend.last_error and "***" in backend.last_error
    assert "sk-leaked-42" not in CheckResult.objects.get().error
