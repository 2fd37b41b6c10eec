"""OpenAPI (drf-spectacular) additions: the bearer key scheme, the router's custom fields, and the gateway's
endpoints (`/v1/*`, `/metrics`), which the raw ASGI gateway serves outside Django but are described here from
the same DRF serializers that validate them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerFieldExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from governance.auth import MasterKeyAuthentication
from routing.responses import ResponsesRequestSerializer
from routing.serializers import (
    ChatCompletionRequestSerializer,
    CompletionRequestSerializer,
    DetokenizeRequestSerializer,
    EmbeddingRequestSerializer,
    RerankRequestSerializer,
    ScoreRequestSerializer,
    TokenizeRequestSerializer,
)

OPENAI_TAG = "OpenAI-compatible API (/v1)"
OPS_TAG = "operations"

# --- extensions ---------------------------------------------------------------------------------------------


class BearerKeyScheme(OpenApiAuthenticationExtension):
    """`Authorization: Bearer <key>`: the master key (management API and /v1) or a client key (/v1)."""

    target_class = "governance.auth.MasterKeyAuthentication"
    name = "bearerKey"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        """HTTP bearer."""
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "The master key (`ROUTER_MASTER_KEY`), or on /v1 a client API key (`sk-llm-...`).",
        }


def _field_extension(target: str, schema: dict[str, Any]) -> type[OpenApiSerializerFieldExtension]:
    """An extension describing one of the router's custom serializer fields with a fixed schema."""

    def map_serializer_field(self: OpenApiSerializerFieldExtension, auto_schema: AutoSchema, direction: str) -> dict:
        return dict(schema)

    name = target.rsplit(".", 1)[1] + "Extension"
    return type(
        name, (OpenApiSerializerFieldExtension,), {"target_class": target, "map_serializer_field": map_serializer_field}
    )


_STRINGS = {"type": "array", "items": {"type": "string"}}
_TOKENS = {"type": "array", "items": {"type": "integer"}}
_MULTIMODAL = {
    "type": "object",
    "properties": {"content": {"type": "array", "items": {"type": "object", "additionalProperties": {}}}},
    "required": ["content"],
}
_SCORE_TEXT = {"oneOf": [{"type": "string"}, _MULTIMODAL]}
FIELD_EXTENSIONS = [
    _field_extension("routing.serializers.StopField", {"oneOf": [{"type": "string"}, _STRINGS]}),
    _field_extension(
        "routing.serializers.ContentField",
        {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "additionalProperties": {}}}]},
    ),
    _field_extension("routing.serializers.JSONObjectField", {"type": "object", "additionalProperties": {}}),
    _field_extension(
        "routing.serializers.PromptField",
        {"oneOf": [{"type": "string"}, _STRINGS, _TOKENS, {"type": "array", "items": _TOKENS}]},
    ),
    _field_extension("routing.serializers.TokenIdsField", _TOKENS),
    _field_extension("routing.serializers.ScoreInputField", _SCORE_TEXT),
    _field_extension(
        "routing.serializers.ScoreInputsField",
        {"oneOf": [_SCORE_TEXT, {"type": "array", "items": _SCORE_TEXT}]},
    ),
    _field_extension(
        "routing.responses.ResponseInputField",
        {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "additionalProperties": {}}}]},
    ),
    _field_extension("routing.responses.MetadataField", {"type": "object", "additionalProperties": {"type": "string"}}),
]

# --- the gateway's endpoints, for the schema only -------------------------------------------------------------

ErrorSerializer = inline_serializer(
    "OpenAIError",
    {
        "error": inline_serializer(
            "OpenAIErrorDetail",
            {
                "message": serializers.CharField(),
                "type": serializers.CharField(),
                "param": serializers.CharField(allow_null=True),
                "code": serializers.CharField(allow_null=True),
            },
        )
    },
)
ERRORS = {
    400: OpenApiResponse(ErrorSerializer, "Invalid JSON or parameter (`param` names it)."),
    401: OpenApiResponse(ErrorSerializer, "Missing or invalid API key."),
    404: OpenApiResponse(ErrorSerializer, "Unknown model, or a model this key may not use."),
    413: OpenApiResponse(ErrorSerializer, "Body larger than ROUTER_MAX_BODY_BYTES."),
    415: OpenApiResponse(ErrorSerializer, "Content-Type is not application/json."),
    429: OpenApiResponse(ErrorSerializer, "Rate limit or daily budget of the key, or every backend at capacity."),
    502: OpenApiResponse(ErrorSerializer, "The backend failed."),
    503: OpenApiResponse(ErrorSerializer, "No backend available (with Retry-After)."),
    504: OpenApiResponse(ErrorSerializer, "The backend timed out."),
}
STREAM_NOTE = (
    " With `stream: true` the answer is `text/event-stream`: `data: {chunk}` events, then `data: [DONE]`; an error "
    "after the first byte arrives as an `event: error` with the error object."
)


class _GatewayDoc(APIView):
    """Base of the documentation-only views: never routed (the gateway serves these paths)."""

    authentication_classes = [MasterKeyAuthentication]
    permission_classes: list[type] = []
    parser_classes = [JSONParser]

    def _unrouted(self) -> Response:
        return Response(status=404)


def _completion_doc(
    serializer: type[serializers.Serializer], operation_id: str, summary: str, can_stream: bool
) -> type[APIView]:
    responses: dict[Any, Any] = {(200, "application/json"): OpenApiTypes.OBJECT, **ERRORS}
    if can_stream:
        responses[(200, "text/event-stream")] = OpenApiTypes.STR

    class Doc(_GatewayDoc):
        @extend_schema(
            tags=[OPENAI_TAG],
            operation_id=operation_id,
            summary=summary,
            description=(
                "OpenAI-compatible; parameters vLLM adds (`top_k`, `min_p`, ...) pass through unchanged. Answers "
                "carry `x-request-id`, `x-router-backend` and, for limited keys, `x-ratelimit-*` headers."
                + (STREAM_NOTE if can_stream else "")
            ),
            request=serializer,
            responses=responses,
        )
        def post(self, request: Request) -> Response:
            return self._unrouted()

    Doc.__name__ = serializer.__name__.removesuffix("RequestSerializer") + "Doc"
    return Doc


class ModelsDoc(_GatewayDoc):
    """GET /v1/models."""

    @extend_schema(
        tags=[OPENAI_TAG],
        operation_id="models_list_openai",
        summary="List the models this key may use",
        responses={
            200: inline_serializer(
                "OpenAIModelList",
                {
                    "object": serializers.CharField(),
                    "data": inline_serializer(
                        "OpenAIModel",
                        {
                            "id": serializers.CharField(),
                            "object": serializers.CharField(),
                            "created": serializers.IntegerField(),
                            "owned_by": serializers.CharField(),
                            "max_model_len": serializers.IntegerField(required=False),
                        },
                        many=True,
                    ),
                },
            ),
            401: ERRORS[401],
        },
    )
    def get(self, request: Request) -> Response:
        return self._unrouted()


class MetricsDoc(_GatewayDoc):
    """GET /metrics."""

    authentication_classes = []

    @extend_schema(
        tags=[OPS_TAG],
        operation_id="metrics",
        summary="Prometheus metrics",
        description="Prometheus text format. Allowed from METRICS_ALLOWED_CIDRS, or with `Bearer METRICS_TOKEN`.",
        responses={(200, "text/plain"): OpenApiTypes.STR, 403: OpenApiResponse(ErrorSerializer, "Not allowed.")},
    )
    def get(self, request: Request) -> Response:
        return self._unrouted()


GATEWAY_ENDPOINTS: list[tuple[str, str, Callable[..., Any]]] = [
    (
        "/v1/chat/completions",
        "POST",
        _completion_doc(ChatCompletionRequestSerializer, "chat_completions_create", "Chat completion", True).as_view(),
    ),
    (
        "/v1/completions",
        "POST",
        _completion_doc(CompletionRequestSerializer, "completions_create", "Text completion", True).as_view(),
    ),
    (
        "/v1/embeddings",
        "POST",
        _completion_doc(EmbeddingRequestSerializer, "embeddings_create", "Embeddings", False).as_view(),
    ),
    *(
        (path, "POST", _completion_doc(RerankRequestSerializer, f"rerank_{suffix}", "Rerank", False).as_view())
        for path, suffix in (("/v1/rerank", "v1"), ("/rerank", "vllm"), ("/v2/rerank", "v2"))
    ),
    *(
        (path, "POST", _completion_doc(ScoreRequestSerializer, f"score_{suffix}", "Score text pairs", False).as_view())
        for path, suffix in (("/v1/score", "v1"), ("/score", "vllm"))
    ),
    (
        "/tokenize",
        "POST",
        _completion_doc(TokenizeRequestSerializer, "tokenize", "Tokenize a prompt or chat messages", False).as_view(),
    ),
    (
        "/detokenize",
        "POST",
        _completion_doc(DetokenizeRequestSerializer, "detokenize", "Token ids back to text", False).as_view(),
    ),
    (
        "/v1/responses",
        "POST",
        _completion_doc(ResponsesRequestSerializer, "responses_create", "Create a response", True).as_view(),
    ),
    ("/v1/models", "GET", ModelsDoc.as_view()),
    ("/metrics", "GET", MetricsDoc.as_view()),
]


def add_gateway_endpoints(endpoints: list[tuple[str, str, str, Callable[..., Any]]]) -> list[tuple[Any, ...]]:
    """Spectacular preprocessing hook: add the gateway's endpoints to those found in Django's URLconf."""
    extra = [(path, "^" + path.lstrip("/") + "$", method, view) for path, method, view in GATEWAY_ENDPOINTS]
    return [*endpoints, *extra]
