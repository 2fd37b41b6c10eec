"""The change signal of a cached snapshot: one row whose version increases on every change of what it covers.

The backend registry (`backends.models.RegistryState`) and the API keys (`governance.models.KeyRegistryState`)
each have one; every web process holds the snapshot in a `routing.registry.RegistryCache`, which polls the
version (one indexed single-row query) and rebuilds the snapshot when it moved.
"""

from __future__ import annotations

from django.db import models, transaction
from django.db.models import F


class VersionRow(models.Model):
    """A single row (pk 1) whose version increases on every change: the cheap change signal."""

    version = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


def version_get(row: type[VersionRow]) -> int:
    """The current version (0 before the first change)."""
    version = row._default_manager.filter(pk=1).values_list("version", flat=True).first()
    return version if version is not None else 0


def version_bump(row: type[VersionRow]) -> None:
    """Increase the version by one (creating the row at 1 the first time)."""
    with transaction.atomic():
        if not row._default_manager.filter(pk=1).update(version=F("version") + 1):
            row._default_manager.get_or_create(pk=1, defaults={"version": 1})
