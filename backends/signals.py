"""Registry change signal: any save or delete of a registry row bumps the version on commit."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import m2m_changed, post_delete, post_save

from backends.models import Backend, GpuPool, ModelFallback, ModelRoute, ServedModel
from backends.services import registry_version_bump_on_commit


def _bump(sender: type, **kwargs: Any) -> None:
    """Signal receiver: schedule a version bump for after the transaction."""
    if kwargs.get("raw"):  # fixtures loading: the loader bumps once at the end
        return
    registry_version_bump_on_commit()


for _model in (GpuPool, Backend, ServedModel, ModelFallback, ModelRoute):
    post_save.connect(_bump, sender=_model, dispatch_uid=f"registry-bump-save-{_model.__name__}")
    post_delete.connect(_bump, sender=_model, dispatch_uid=f"registry-bump-delete-{_model.__name__}")
m2m_changed.connect(_bump, sender=ServedModel.fallback_pools.through, dispatch_uid="registry-bump-m2m")
