"""Django REST framework helpers shared by the apps' management APIs."""

from __future__ import annotations

import copy
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models as db_models
from rest_framework import serializers


class FullCleanMixin:
    """Run the model's `full_clean()` so the API rejects exactly what admin rejects."""

    def _full_clean(self, instance: db_models.Model) -> None:
        try:
            instance.full_clean()
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages) from exc

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        instance = getattr(self, "instance", None)
        model_class = self.Meta.model  # type: ignore[attr-defined]
        if instance is None:
            candidate = model_class(**_plain_attrs(model_class, attrs))
        else:
            # A copy of the stored row with the changes applied: partial updates validate the whole row.
            candidate = copy.copy(instance)
            for key, value in _plain_attrs(model_class, attrs).items():
                setattr(candidate, key, value)
        self._full_clean(candidate)
        return attrs


def _plain_attrs(model_class: type[db_models.Model], attrs: dict[str, Any]) -> dict[str, Any]:
    """The attrs that are concrete fields (not many-to-many), foreign keys as `<name>_id`."""
    concrete = {f.name for f in model_class._meta.concrete_fields}
    plain = {}
    for key, value in attrs.items():
        if key not in concrete:
            continue
        if isinstance(value, db_models.Model):
            plain[f"{key}_id"] = value.pk
        else:
            plain[key] = value
    return plain
