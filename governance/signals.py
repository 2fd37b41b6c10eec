"""Key change signal: saving or deleting a key bumps the key registry version on commit."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save

from governance.models import ApiKey
from governance.services import key_registry_bump_on_commit


def _bump(sender: type, **kwargs: Any) -> None:
    if kwargs.get("raw"):
        return
    key_registry_bump_on_commit()


post_save.connect(_bump, sender=ApiKey, dispatch_uid="key-registry-bump-save")
post_delete.connect(_bump, sender=ApiKey, dispatch_uid="key-registry-bump-delete")
