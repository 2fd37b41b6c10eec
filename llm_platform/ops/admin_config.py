"""`django.contrib.admin` with the operations dashboard's site as `admin.site` (kept apart from `site`, which
imports the models: INSTALLED_APPS imports this module before the models are ready)."""

from __future__ import annotations

from django.contrib.admin.apps import AdminConfig


class OpsAdminConfig(AdminConfig):
    """`django.contrib.admin` whose default site is `OpsAdminSite`."""

    default_site = "llm_platform.ops.site.OpsAdminSite"
