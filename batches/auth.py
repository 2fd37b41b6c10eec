"""Bearer keys on the Batch API: the master key, or an enabled, unexpired client key looked up by its SHA-256."""

from __future__ import annotations

import time

from django.contrib.auth.models import AnonymousUser
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from governance.auth import MASTER, Principal, bearer_token, master_key_matches
from governance.models import key_hash
from governance.selectors import key_snapshot_build


def principal_for_token(token: str, master_key: str) -> Principal | None:
    """The principal of a bearer token; None when it is no valid key. AuthenticationFailed when expired."""
    if master_key_matches(token, master_key):
        return MASTER
    key = key_snapshot_build().by_hash.get(key_hash(token))
    if key is None:
        return None
    if key.expires_at is not None and key.expires_at <= time.time():
        raise AuthenticationFailed("This API key has expired.")
    return Principal(name=key.name, is_master=False, key=key)


class _KeyUser(AnonymousUser):
    """A request user standing for an API key (not a database user, not staff)."""

    @property
    def is_authenticated(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_anonymous(self) -> bool:  # type: ignore[override]
        return False


class BearerKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer <key>`: the master key or a client key, as on /v1."""

    def authenticate(self, request: Request) -> tuple[object, Principal] | None:
        from django.conf import settings

        token = bearer_token(get_authorization_header(request))
        if token is None:
            return None
        principal = principal_for_token(token, settings.ROUTER_MASTER_KEY)
        if principal is None:
            raise AuthenticationFailed("Invalid API key.")
        return _KeyUser(), principal

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"


class HasKey(BasePermission):
    """A request authenticated by a bearer key."""

    def has_permission(self, request: Request, view: object) -> bool:
        return isinstance(request.auth, Principal)


class BearerKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """OpenAPI: the same bearer scheme as the rest of the API."""

    target_class = "batches.auth.BearerKeyAuthentication"
    name = "clientBearerKey"

    def get_security_definition(self, auto_schema: object) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "The master key (`ROUTER_MASTER_KEY`), or on /v1 a client API key (`sk-llm-...`).",
        }
