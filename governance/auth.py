"""Authentication of API clients (bearer keys) for /v1 and the management API."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from governance.snapshot import KeySnap


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the master key or a client key (with its model access and limits)."""

    name: str
    is_master: bool
    key: KeySnap | None = None


MASTER = Principal(name="master", is_master=True)


def bearer_token(authorization: bytes | None) -> str | None:
    """Extract the token from an `Authorization: Bearer <token>` header value."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    try:
        return token.strip().decode("ascii")
    except UnicodeDecodeError:
        return None


def master_key_matches(token: str, master_key: str) -> bool:
    """Constant-time comparison of a presented token with the master key (an empty master key matches nothing)."""
    return bool(master_key) and hmac.compare_digest(token.encode(), master_key.encode())


class MasterKeyAuthentication(BaseAuthentication):
    """DRF authentication for the management API: the master key as a bearer token acts as a staff user."""

    def authenticate(self, request: Request) -> tuple[object, Principal] | None:
        """Return a staff pseudo-user when the master key is presented."""
        token = bearer_token(get_authorization_header(request))
        if token is None or not master_key_matches(token, settings.ROUTER_MASTER_KEY):
            return None
        return _MasterUser(), MASTER

    def authenticate_header(self, request: Request) -> str:
        """Make DRF answer 401 (not 403) when no credentials are given."""
        return "Bearer"


class _MasterUser(AnonymousUser):
    """A request user standing for the master key: staff, not a database row."""

    is_staff = True  # type: ignore[assignment]  # django-stubs types AnonymousUser's as Literal[False]
    is_superuser = True  # type: ignore[assignment]

    @property
    def is_authenticated(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_anonymous(self) -> bool:  # type: ignore[override]
        return False
