"""Validators shared by the registry's models and the checks' models (kept apart so neither imports the other)."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")


def validate_name(value: str) -> None:
    """Reject names that would be awkward in URLs, logs and YAML (spaces, control characters)."""
    if not _NAME_RE.match(value or ""):
        raise ValidationError(
            "Use letters, digits and . _ : / @ - only, starting with a letter or digit.", code="invalid_name"
        )


__all__ = ["validate_name"]
