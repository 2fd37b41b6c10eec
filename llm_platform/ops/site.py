"""The admin site whose front page is the operations dashboard, with its JSON refresh endpoint.

Installed in place of `django.contrib.admin` (INSTALLED_APPS: `llm_platform.ops.admin_config.OpsAdminConfig`), so
`admin.site` is an `OpsAdminSite` and every `@admin.register` of the apps is unchanged. The views are thin: the
figures come from `llm_platform.ops.selectors`.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, path, reverse

from llm_platform.ops.selectors import dashboard_charts, dashboard_get


class OpsAdminSite(admin.AdminSite):
    """Django's admin site with the operations dashboard above the app list on the index page."""

    index_template = "ops/index.html"

    def get_urls(self) -> list[URLResolver | URLPattern]:
        own = [path("ops/data/", self.admin_view(self.dashboard_data), name="ops_dashboard_data")]
        return own + super().get_urls()

    def index(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> TemplateResponse:
        """The admin index with the dashboard's figures and charts (the app list stays below them)."""
        context = {
            "dashboard": dashboard_get(),
            "charts": dashboard_charts(),
            "refresh_s": settings.OPS_DASHBOARD_REFRESH_S,
            "data_url": reverse(f"{self.name}:ops_dashboard_data"),
            **(extra_context or {}),
        }
        return super().index(request, context)

    def dashboard_data(self, request: HttpRequest) -> HttpResponse:
        """The dashboard's figures as JSON, with the live part rendered as HTML (and the charts when `?charts=1`),
        which the index page's script swaps in every OPS_DASHBOARD_REFRESH_S seconds."""
        dashboard = dashboard_get()
        body: dict[str, Any] = {
            **dashboard.as_json(),
            "html": {"live": render_to_string("ops/live.html", {"dashboard": dashboard}, request=request)},
        }
        if request.GET.get("charts") == "1":
            body["html"]["charts"] = render_to_string("ops/charts.html", {"charts": dashboard_charts()})
        return JsonResponse(body)  # admin_view marks it never cached
