"""Management API for API keys: the secret is in the response of create and rotate only, never again."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from core.drf import FullCleanMixin
from governance.models import ApiKey
from governance.services import api_key_generate, api_key_revoke, api_key_rotate, key_secret_set


class ApiKeySerializer(FullCleanMixin, serializers.ModelSerializer):
    """An API key: no secret and no hash in any representation; limits validated as in admin."""

    owner = serializers.SlugRelatedField(
        slug_field="username", queryset=get_user_model().objects.all(), required=False, allow_null=True
    )

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "owner",
            "prefix",
            "allowed_models",
            "enabled",
            "expires_at",
            "rpm_limit",
            "tpm_limit",
            "daily_token_budget",
            "priority_default",
            "priority_max",
            "queue_weight",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["prefix", "created_at", "updated_at"]


class ApiKeyCreatedSerializer(ApiKeySerializer):
    """The key as created or rotated, with its secret (shown this once)."""

    secret = serializers.CharField(read_only=True)

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "secret"]


class ApiKeyViewSet(viewsets.ModelViewSet):
    """CRUD for API keys, plus revoke and rotate."""

    queryset = ApiKey.objects.select_related("owner")
    serializer_class = ApiKeySerializer
    lookup_field = "name"

    @extend_schema(responses={201: ApiKeyCreatedSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Create a key; the response carries the secret, which is stored only as a hash."""
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        secret = api_key_generate()
        key = ApiKey(**serializer.validated_data)
        key_secret_set(key=key, secret=secret)
        key.save()
        data = ApiKeyCreatedSerializer(key).data | {"secret": secret}
        return Response(data, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})

    @extend_schema(request=None, responses=ApiKeyCreatedSerializer)
    @action(detail=True, methods=["post"])
    def rotate(self, request: Request, name: str | None = None) -> Response:
        """Give the key a new secret (the old one stops working within 2 s); the response carries it."""
        key = self.get_object()
        secret = api_key_rotate(key=key)
        return Response(ApiKeyCreatedSerializer(key).data | {"secret": secret}, headers={"Cache-Control": "no-store"})

    @extend_schema(request=None, responses=ApiKeySerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, name: str | None = None) -> Response:
        """Disable the key (within 2 s on every process)."""
        key = self.get_object()
        api_key_revoke(key=key)
        return Response(ApiKeySerializer(key).data)
