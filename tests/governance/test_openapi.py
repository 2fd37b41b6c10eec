"""The OpenAPI schema: generated without warnings, valid, includes the gateway's /v1 endpoints; Swagger UI is served
from the sidecar's files (no CDN)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.test import Client
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema


def test_schema_generates_without_warnings_and_validates(tmp_path: Path) -> None:
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    schema = yaml.safe_load(out.read_text())
    validate_schema(schema)
    paths = schema["paths"]
    for path in ("/api/pools/", "/api/backends/{name}/", "/api/models/", "/api/usage/", "/api/check-runs/"):
        assert path in paths, path
    assert schema["components"]["securitySchemes"]["bearerKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearerKey"]["description"],
    }


def test_schema_describes_the_gateway_from_its_serializers() -> None:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(request["required"])
    assert request["properties"]["temperature"]["maximum"] == 2
    assert "oneOf" in request["properties"]["stop"]
    prompt = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert len(prompt["oneOf"]) == 4
    for path in ("/v1/completions", "/v1/embeddings", "/v1/models", "/metrics"):
        assert path in schema["paths"], path


def test_schema_describes_every_endpoint_of_the_gateway_table() -> None:
    from routing.gateway import ENDPOINTS

    schema = SchemaGenerator().get_schema(request=None, public=True)
    for path, endpoint in ENDPOINTS.items():
        post = schema["paths"][path]["post"]
        name = endpoint.serializer.__name__.removesuffix("Serializer")
        assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    rerank = schema["components"]["schemas"]["RerankRequest"]
    assert {"model", "query", "documents"} <= set(rerank["required"])
    assert "oneOf" in rerank["properties"]["documents"]


@pytest.mark.django_db
def test_schema_and_swagger_ui_are_served_without_cdn(client: Client) -> None:
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "cdn.jsdelivr.net" not in html and "unpkg" not in html
    assert "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    assert finders.find("drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")
