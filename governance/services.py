"""Writes of governance: creating and revoking keys, the key change signal."""

from __future__ import annotations

import secrets
from datetime import datetime

from django.contrib.auth.models import User
from django.db import transaction

from core.versions import version_bump
from governance.models import KEY_PREFIX_LENGTH, ApiKey, KeyRegistryState, key_hash
from governance.priority import Priority


def key_registry_bump() -> None:
    """Increase the key registry version so every web process reloads its key cache."""
    version_bump(KeyRegistryState)


def key_registry_bump_on_commit() -> None:
    """Bump the key registry version once the current transaction commits."""
    transaction.on_commit(key_registry_bump)


def api_key_generate() -> str:
    """A new random key secret (about 190 bits)."""
    return "sk-llm-" + secrets.token_urlsafe(32)


def api_key_create(
    *,
    name: str,
    owner: User | None = None,
    allowed_models: list[str] | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    daily_token_budget: int | None = None,
    expires_at: datetime | None = None,
    priority_default: str = Priority.STANDARD.value,
    priority_max: str = Priority.STANDARD.value,
    queue_weight: int = 1,
) -> tuple[ApiKey, str]:
    """Create a key; return the row and the secret, which is shown once and stored only as a hash.

    `priority_default` / `priority_max`: the class of its requests that name none, and the highest they may ask
    for (critical, standard, batch); `queue_weight`: its share of a full pool against keys of the same class.
    """
    secret = api_key_generate()
    key = ApiKey(
        name=name,
        owner=owner,
        allowed_models=allowed_models or [],
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
        daily_token_budget=daily_token_budget,
        expires_at=expires_at,
        priority_default=priority_default,
        priority_max=priority_max,
        queue_weight=queue_weight,
    )
    key_secret_set(key=key, secret=secret)
    key.full_clean()
    key.save()
    return key, secret


def key_secret_set(*, key: ApiKey, secret: str) -> None:
    """Store a secret's hash and prefix on a key (not saved)."""
    key.key_hash = key_hash(secret)
    key.prefix = secret[:KEY_PREFIX_LENGTH]


def api_key_rotate(*, key: ApiKey) -> str:
    """Give a key a new secret (the old one stops working within the reload interval); return it."""
    secret = api_key_generate()
    key_secret_set(key=key, secret=secret)
    key.save(update_fields=["key_hash", "prefix", "updated_at"])
    return secret


def api_key_revoke(*, key: ApiKey) -> None:
    """Disable a key; every web process rejects it within the reload interval."""
    key.enabled = False
    key.save(update_fields=["enabled", "updated_at"])
