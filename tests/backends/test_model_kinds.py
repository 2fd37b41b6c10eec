"""The `rerank` model kind (cross-encoders) is selectable everywhere a model is configured, and routes by it."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.test import APIClient

from backends.models import ModelKind, ServedModel
from backends.registry_io import registry_export, registry_import, registry_yaml_dump, registry_yaml_load
from backends.selectors import registry_snapshot_build
from routing.gateway import ENDPOINTS
from tests.conftest import MASTER_KEY
from tests.factories import model_create, pool_create

pytestmark = pytest.mark.django_db


def test_the_endpoint_table_names_only_known_kinds_and_every_kind_serves_something() -> None:
    kinds = {kind.value for kind in ModelKind}
    served = {path: endpoint.kinds for path, endpoint in ENDPOINTS.items()}
    assert all(endpoint_kinds <= kinds for endpoint_kinds in served.values()), served
    assert {kind for endpoint_kinds in served.values() for kind in endpoint_kinds} == kinds
    # a reranker serves rerank and score (and the tokenizer), not embeddings or chat
    rerank_paths = {path for path, endpoint_kinds in served.items() if "rerank" in endpoint_kinds}
    assert rerank_paths == {"/v1/rerank", "/rerank", "/v2/rerank", "/v1/score", "/score", "/tokenize", "/detokenize"}


def test_yaml_import_and_export_carry_the_rerank_kind() -> None:
    doc = {
        "pools": [{"name": "rerankers", "backends": [{"name": "rr-1", "base_url": "http://rr-1.internal:8000"}]}],
        "models": [{"name": "bge-reranker", "pool": "rerankers", "kind": "rerank"}],
    }
    report = registry_import(document=doc)
    assert report.models.created == ["bge-reranker"]
    assert ServedModel.objects.get(name="bge-reranker").kind == "rerank"
    text = registry_yaml_dump(document=registry_export())
    assert "kind: rerank" in text
    assert registry_yaml_load(text=text)["models"][0]["kind"] == "rerank"
    # and the snapshot the router reads carries it
    assert registry_snapshot_build().models["bge-reranker"].kind == "rerank"


def test_management_api_accepts_rerank_and_rejects_unknown_kinds() -> None:
    pool_create(name="rr")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    created = api.post("/api/models/", {"name": "reranker", "pool": "rr", "kind": "rerank"}, format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["kind"] == "rerank"
    refused = api.post("/api/models/", {"name": "other", "pool": "rr", "kind": "speech"}, format="json")
    assert refused.status_code == 400 and "kind" in refused.json()


def test_admin_offers_the_rerank_kind(admin_client: Client) -> None:
    page = admin_client.get("/admin/backends/servedmodel/add/")
    assert page.status_code == 200
    assert b'value="rerank"' in page.content
    model = model_create(name="rr-admin", kind="rerank")
    listing = admin_client.get("/admin/backends/servedmodel/?kind__exact=rerank")
    assert model.name.encode() in listing.content
