"""The operations dashboard app: its templates and static files (the admin site itself is in `site`)."""

from __future__ import annotations

from django.apps import AppConfig


class OpsConfig(AppConfig):
    """Templates and static files of the dashboard; no models."""

    name = "llm_platform.ops"
    label = "ops"
    verbose_name = "Operations"
