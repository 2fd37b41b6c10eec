"""Traffic splits and shadows in the registry: validation, the routing snapshot, admin, the API and the YAML."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from backends.models import ModelRoute, ServedModel, ShadowComparison
from backends.registry_io import RegistryImportError, registry_export, registry_import
from backends.selectors import registry_snapshot_build, registry_version_get, shadow_comparison_summary
from backends.services import shadow_comparisons_add
from tests.conftest import MASTER_KEY
from tests.factories import model_create, pool_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def models() -> dict[str, ServedModel]:
    pool = pool_create(name="gpu")
    return {
        "mychat": model_create(pool=pool, name="mychat", served_name="served-v1"),
        "chat-v1": model_create(pool=pool, name="chat-v1", served_name="served-v1"),
        "chat-v2": model_create(pool=pool, name="chat-v2", served_name="served-v2"),
        "embed": model_create(pool=pool, name="embed", kind="embedding"),
    }


def route(model: ServedModel, target: ServedModel, percent: float, kind: str = "split") -> ModelRoute:
    row = ModelRoute(model=model, kind=kind, target=target, percent=percent)
    row.full_clean()
    row.save()
    return row


# --- validation ----------------------------------------------------------------------------------------------


def test_a_route_goes_to_another_model_of_the_same_kind(models: dict[str, ServedModel]) -> None:
    with pytest.raises(ValidationError, match="itself"):
        route(models["mychat"], models["mychat"], 5)
    with pytest.raises(ValidationError, match="embedding model"):
        route(models["mychat"], models["embed"], 5)
    for percent in (0, 100.5, -1):
        with pytest.raises(ValidationError):
            route(models["mychat"], models["chat-v2"], percent)


def test_sticky_key_is_user_or_a_header(models: dict[str, ServedModel]) -> None:
    model = models["mychat"]
    for good in ("", "user", "header:x-session-id"):
        model.split_sticky_key = good
        model.full_clean()
    for bad in ("header:", "cookie", "session"):
        model.split_sticky_key = bad
        with pytest.raises(ValidationError, match="split_sticky_key"):
            model.full_clean()


def test_saving_a_route_bumps_the_registry_version(
    models: dict[str, ServedModel], django_capture_on_commit_callbacks: Any
) -> None:
    before = registry_version_get()
    with django_capture_on_commit_callbacks(execute=True):
        route(models["mychat"], models["chat-v2"], 5)
    assert registry_version_get() > before


# --- the snapshot --------------------------------------------------------------------------------------------


def test_snapshot_split_keeps_the_rest_on_the_model(models: dict[str, ServedModel]) -> None:
    route(models["mychat"], models["chat-v2"], 5)
    models["mychat"].split_sticky_key = "user"
    models["mychat"].save()
    split = registry_snapshot_build().splits["mychat"]
    assert [m.name for m in split.targets] == ["mychat", "chat-v2"]
    assert split.bounds == pytest.approx((0.95, 1.0))
    assert split.sticky_key == "user"


def test_snapshot_split_drops_disabled_targets_and_rescales(models: dict[str, ServedModel]) -> None:
    route(models["mychat"], models["chat-v1"], 60)
    route(models["mychat"], models["chat-v2"], 20)
    ServedModel.objects.filter(name="chat-v1").update(enabled=False)
    split = registry_snapshot_build().splits["mychat"]
    assert [m.name for m in split.targets] == ["mychat", "chat-v2"]
    assert split.bounds == pytest.approx((0.5, 1.0))  # 20 % own, 20 % chat-v2
    ServedModel.objects.filter(name="chat-v2").update(enabled=False)
    assert "mychat" not in registry_snapshot_build().splits  # only the model itself is left: no split


def test_a_model_its_backends_do_not_serve_is_routed_through_a_full_split(models: dict[str, ServedModel]) -> None:
    # given mychat, which no backend lists (the probe marked it), split 95/5 between two served versions
    ServedModel.objects.filter(name="mychat").update(unavailable_reason="no backend lists 'served-v1'")
    route(models["mychat"], models["chat-v1"], 95)
    route(models["mychat"], models["chat-v2"], 5)
    snapshot = registry_snapshot_build()
    # then it is listed and routed through its split alone
    assert "mychat" in snapshot.models and "mychat" not in snapshot.unavailable
    assert "mychat" in [m.name for m in snapshot.listed_models]
    assert [m.name for m in snapshot.splits["mychat"].targets] == ["chat-v1", "chat-v2"]
    # but a split that leaves it a share it cannot serve keeps it unavailable
    ModelRoute.objects.filter(target__name="chat-v1").update(percent=50)
    snapshot = registry_snapshot_build()
    assert "mychat" not in snapshot.models and "mychat" not in snapshot.splits


def test_snapshot_shadows(models: dict[str, ServedModel]) -> None:
    route(models["chat-v1"], models["chat-v2"], 10, kind="shadow")
    shadows = registry_snapshot_build().shadows["chat-v1"]
    assert [(s.target.name, s.share) for s in shadows] == [("chat-v2", pytest.approx(0.1))]
    ServedModel.objects.filter(name="chat-v2").update(enabled=False)
    assert "chat-v1" not in registry_snapshot_build().shadows


# --- admin ---------------------------------------------------------------------------------------------------


def _model_form(model: ServedModel, routes: list[tuple[str, ServedModel, float]]) -> dict[str, object]:
    data: dict[str, object] = {
        "name": model.name,
        "served_name": model.served_name,
        "aliases": "",
        "kind": model.kind,
        "pool": model.pool_id,
        "enabled": "on",
        "split_sticky_key": "user",
        "fallbacks-TOTAL_FORMS": "0",
        "fallbacks-INITIAL_FORMS": "0",
        "routes-TOTAL_FORMS": str(len(routes)),
        "routes-INITIAL_FORMS": "0",
    }
    for i, (kind, target, percent) in enumerate(routes):
        data.update({f"routes-{i}-kind": kind, f"routes-{i}-target": target.pk, f"routes-{i}-percent": percent})
    return data


def test_admin_edits_the_split_inline_and_rejects_more_than_100_percent(
    admin_client: Client, models: dict[str, ServedModel]
) -> None:
    url = f"/admin/backends/servedmodel/{models['mychat'].pk}/change/"
    page = admin_client.get(url)
    assert page.status_code == 200 and b"Traffic split and shadow" in page.content
    too_much = _model_form(models["mychat"], [("split", models["chat-v1"], 95), ("split", models["chat-v2"], 10)])
    response = admin_client.post(url, too_much)
    assert response.status_code == 200 and b"adds up to 105 %" in response.content
    assert not ModelRoute.objects.exists()
    ok = _model_form(
        models["mychat"],
        [("split", models["chat-v1"], 95), ("split", models["chat-v2"], 5), ("shadow", models["chat-v2"], 50)],
    )
    assert admin_client.post(url, ok).status_code == 302
    assert ServedModel.objects.get(name="mychat").split_sticky_key == "user"
    assert sorted(ModelRoute.objects.values_list("kind", "target__name", "percent")) == [
        ("shadow", "chat-v2", 50.0),
        ("split", "chat-v1", 95.0),
        ("split", "chat-v2", 5.0),
    ]


def test_shadow_comparison_is_shown_in_admin_per_model_pair(
    admin_client: Client, models: dict[str, ServedModel]
) -> None:
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    tally = {
        "mirrored": 10,
        "errors": 2,
        "dropped": 3,
        "compared": 8,
        "matched": 6,
        "primary_latency_ms_sum": 800.0,
        "shadow_latency_ms_sum": 1200.0,
        "primary_completion_tokens": 80,
        "shadow_completion_tokens": 96,
        "prompt_tokens_delta": 0,
    }
    # two flushes of the same hour add up
    shadow_comparisons_add(hour=hour, tallies={("chat-v1", "chat-v2"): tally})
    shadow_comparisons_add(hour=hour, tallies={("chat-v1", "chat-v2"): tally})
    row = ShadowComparison.objects.get()
    assert (row.mirrored, row.errors, row.dropped, row.matched) == (20, 4, 6, 12)
    page = admin_client.get("/admin/backends/shadowcomparison/").content.decode()
    assert "75.0 % of 16" in page  # matches
    assert "×1.50" in page  # latency ratio
    assert "+2.0" in page  # completion tokens per successful answer: (192 - 160) / 16
    summary = shadow_comparison_summary(since=hour, primary="chat-v1")
    assert summary[0]["match_ratio"] == 0.75 and summary[0]["latency_ratio"] == 1.5
    model_page = admin_client.get(f"/admin/backends/servedmodel/{models['chat-v1'].pk}/change/").content.decode()
    assert "Shadow comparison (last 24 h)" in model_page
    assert "→ chat-v2: 20 mirrored, 4 errors, 6 dropped; text match 75.0 % of 16 compared; latency ×1.50" in model_page


# --- management API ------------------------------------------------------------------------------------------


@pytest.fixture
def api() -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    return client


def test_api_sets_and_shows_the_split_and_shadows(api: APIClient, models: dict[str, ServedModel]) -> None:
    body = {
        "split_sticky_key": "header:x-session-id",
        "traffic_split": [{"model": "chat-v1", "percent": 95}, {"model": "chat-v2", "percent": 5}],
        "shadows": [{"model": "chat-v2", "percent": 10}],
    }
    response = api.patch("/api/models/mychat/", body, format="json")
    assert response.status_code == 200, response.json()
    shown = api.get("/api/models/mychat/").json()
    assert shown["traffic_split"] == [{"model": "chat-v1", "percent": 95.0}, {"model": "chat-v2", "percent": 5.0}]
    assert shown["shadows"] == [{"model": "chat-v2", "percent": 10.0}]
    assert shown["split_sticky_key"] == "header:x-session-id"
    # a PATCH without the lists leaves them; an empty list removes them
    api.patch("/api/models/mychat/", {"enabled": True}, format="json")
    assert ModelRoute.objects.count() == 3
    api.patch("/api/models/mychat/", {"shadows": []}, format="json")
    assert set(ModelRoute.objects.values_list("kind", flat=True)) == {"split"}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"model": "chat-v1", "percent": 95}, {"model": "chat-v2", "percent": 6}], "adds up to 101 %"),
        ([{"model": "nope", "percent": 5}], "unknown model 'nope'"),
        ([{"model": "mychat", "percent": 5}], "itself"),
        ([{"model": "embed", "percent": 5}], "embedding model"),
        ([{"model": "chat-v1", "percent": 0}], "greater than or equal to 0.01"),
    ],
)
def test_api_rejects_a_bad_split(api: APIClient, models: dict[str, ServedModel], entries: list, message: str) -> None:
    response = api.patch("/api/models/mychat/", {"traffic_split": entries}, format="json")
    assert response.status_code == 400
    assert message in str(response.json())
    assert not ModelRoute.objects.exists()


# --- YAML ----------------------------------------------------------------------------------------------------


def test_yaml_routes_may_point_at_models_created_by_the_same_document() -> None:
    document: dict[str, Any] = {
        "pools": [{"name": "gpu"}],
        "models": [
            {
                "name": "mychat",
                "pool": "gpu",
                "split_sticky_key": "user",
                "traffic_split": [{"model": "zz-chat-v2", "percent": 5}],
                "shadows": [{"model": "zz-chat-v2", "percent": 1.5}],
            },
            {"name": "zz-chat-v2", "pool": "gpu"},
        ],
    }
    report = registry_import(document=document)
    assert report.models.created == ["mychat", "zz-chat-v2"]
    exported = {m["name"]: m for m in registry_export()["models"]}
    assert exported["mychat"]["traffic_split"] == [{"model": "zz-chat-v2", "percent": 5.0}]
    assert exported["mychat"]["shadows"] == [{"model": "zz-chat-v2", "percent": 1.5}]
    # importing it again changes nothing; changing a share is reported as an update of that key
    assert not registry_import(document=document).changed
    document["models"][0]["traffic_split"] = [{"model": "zz-chat-v2", "percent": 10}]
    assert registry_import(document=document).models.updated == {"mychat": ["traffic_split"]}


@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ([{"model": "ghost", "percent": 5}], "field 'traffic_split': unknown model 'ghost'"),
        ([{"model": "b", "percent": 60}, {"model": "b", "percent": 50}], "a model is listed more than once"),
        ([{"model": "b", "percent": "5"}], "item 0: expected a number, got a string"),
        ([{"model": "b"}], "expected exactly the keys 'model' and 'percent'"),
        ("b", "expected a list of {model, percent} mappings"),
    ],
)
def test_yaml_rejects_bad_routes_and_changes_nothing(entries: object, error: str) -> None:
    document = {
        "pools": [{"name": "gpu"}],
        "models": [{"name": "a", "pool": "gpu", "traffic_split": entries}, {"name": "b", "pool": "gpu"}],
    }
    with pytest.raises(RegistryImportError) as caught:
        registry_import(document=document)
    assert any(error in e for e in caught.value.errors), caught.value.errors
    assert not ServedModel.objects.exists()
