"""Management API answers to input that used to crash it: a 4xx with the reason, never a 500."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from backends.models import GpuPool
from tests.conftest import MASTER_KEY
from tests.factories import model_create, pool_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    return client


def test_deleting_a_pool_that_models_use_is_409_with_the_reason(api: APIClient) -> None:
    # given a pool that two models are served from
    pool = pool_create(name="gpu-a")
    model_create(pool=pool, name="llama")
    model_create(pool=pool, name="qwen")
    # when it is deleted
    answer = api.delete("/api/pools/gpu-a/")
    # then the answer is a conflict naming what still uses it, and the pool is still there
    assert answer.status_code == 409, answer.content[:300]
    body = answer.json()
    assert body["code"] == "protected" and body["protected"] == ["llama", "qwen"]
    assert "llama" in body["detail"] and "models" in body["detail"]
    assert GpuPool.objects.filter(name="gpu-a").exists()


@pytest.mark.parametrize(
    "query",
    [
        {"to": "0001-01-01T00:00:00Z"},
        {"to": "0001-01-01T00:00:00Z", "group_by": "day"},
        {"from": "0001-01-01T00:00:00Z"},
        {"from": "0001-01-01T00:00:00Z", "to": "0001-01-01T05:00:00Z"},
        {"to": "0001-01-01T00:00:00+05:00"},
        {"to": "0001-01-01T00:00:00-05:00"},
        {"from": "9999-12-31T23:00:00Z", "to": "9999-12-31T23:59:59Z"},
        {"from": "9999-12-31T23:00:00-05:00"},
        {"to": "9999-12-31T23:59:59.999999Z", "group_by": "day"},
    ],
    ids=lambda q: "&".join(f"{k}={v}" for k, v in q.items()),
)
def test_usage_dates_out_of_range_are_400(api: APIClient, query: dict[str, str]) -> None:
    # when the usage report is asked for a range at the edge of what a datetime can hold
    answer = api.get("/api/usage/", query)
    # then the answer names the bad parameter (DRF's validation shape), never a 500
    assert answer.status_code == 400, answer.content[:300]
    assert set(answer.json()) <= {"from", "to", "non_field_errors"}


def test_usage_dates_within_range_still_work(api: APIClient) -> None:
    answer = api.get("/api/usage/", {"from": "2000-01-01T00:00:00Z", "to": "2000-01-02T00:00:00Z"})
    assert answer.status_code == 200 and answer.json()["results"] == []
