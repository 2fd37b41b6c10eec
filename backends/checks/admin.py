"""Admin of the checks: cases, runs (report table, latency chart, Markdown download, "Run checks now"), results,
and the check trends + "Run checks now" action added to the Backend and Model pages."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.loader import render_to_string
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from backends.admin import STATUS_COLOURS, BackendAdmin, ServedModelAdmin
from backends.checks.charts import run_latency_svg, trend_charts_html
from backends.checks.models import CaseEndpoint, CheckCase, CheckResult, CheckRun, RunStatus, RunTrigger
from backends.checks.report import run_headline, run_markdown
from backends.checks.selectors import (
    TREND_RUNS,
    check_failures,
    check_run_matrix,
    check_run_results,
    check_trend_for_backend,
    check_trend_for_model,
)
from backends.checks.services import check_run_start
from backends.models import Backend, HealthStatus, ServedModel
from core.admin_ui import badge

PASS_COLOUR = STATUS_COLOURS[HealthStatus.HEALTHY]
FAIL_COLOUR = STATUS_COLOURS[HealthStatus.UNHEALTHY]
SLOW_COLOUR = STATUS_COLOURS[HealthStatus.DEGRADED]
RUN_STATUS_COLOURS = {
    RunStatus.QUEUED: STATUS_COLOURS[HealthStatus.UNKNOWN],
    RunStatus.RUNNING: "#0969da",
    RunStatus.PASSED: PASS_COLOUR,
    RunStatus.FAILED: FAIL_COLOUR,
    RunStatus.ERROR: SLOW_COLOUR,
}


def result_colour(result: CheckResult) -> str:
    """Green for a pass, orange for a slow (but correct) answer, red for any other failure."""
    if result.passed:
        return PASS_COLOUR
    return SLOW_COLOUR if result.cause == "slow" else FAIL_COLOUR


def result_badge(result: CheckResult) -> str:
    """PASS, or FAIL with its cause, as a coloured badge."""
    text = "PASS" if result.passed else f"FAIL · {result.get_cause_display()}"
    return badge(text, result_colour(result))


def run_status_badge(run: CheckRun) -> str:
    """The run's status as a coloured badge."""
    return badge(run.get_status_display(), RUN_STATUS_COLOURS.get(RunStatus(run.status), "#6e7781"))


def _who(request: HttpRequest) -> str:
    """The staff user starting a run."""
    return getattr(request.user, "get_username", lambda: "")() or "staff"


def _report_started_message(model_admin: admin.ModelAdmin, request: HttpRequest, run: CheckRun) -> None:
    """Tell the operator the run is queued, with a link to its page."""
    url = reverse("admin:backends_checkrun_change", args=[run.pk])
    model_admin.message_user(
        request,
        format_html(
            'Check run <a href="{}">#{}</a> queued: the Celery worker runs it and its page shows the report.',
            url,
            run.pk,
        ),
    )


# -- cases ---------------------------------------------------------------------------------------------------


@admin.register(CheckCase)
class CheckCaseAdmin(admin.ModelAdmin):
    """Prompts with their expected result, parameters, models and limits."""

    list_display = (
        "name",
        "endpoint",
        "expectation",
        "expected_text",
        "stream",
        "temperature",
        "max_tokens",
        "slow_threshold_s",
        "applies_to",
        "enabled",
    )
    list_filter = ("enabled", "endpoint", "expectation", "stream")
    list_editable = ("enabled",)
    search_fields = ("name", "description", "expected_text", "query")
    filter_horizontal = ("models",)
    fieldsets = (
        (None, {"fields": ("name", "description", "enabled")}),
        (
            "Request",
            {
                "fields": (
                    "endpoint",
                    "messages",
                    "query",
                    "documents",
                    "temperature",
                    "max_tokens",
                    "stream",
                    "extra_params",
                ),
                "description": "Chat and Responses cases send `messages` (max_tokens is the Responses API's "
                "max_output_tokens); rerank cases send `query` and `documents`, and their answer is the text of "
                "the document ranked first.",
            },
        ),
        ("Expected result", {"fields": ("expectation", "expected_text", "case_sensitive")}),
        ("Applies to", {"fields": ("models",)}),
        ("Limits", {"fields": ("latency_budget_s", "slow_threshold_s")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[CheckCase]:
        """Cases with their models (for the list column)."""
        return super().get_queryset(request).prefetch_related("models")

    @admin.display(description="models")
    def applies_to(self, obj: CheckCase) -> str:
        names = [m.name for m in obj.models.all()]
        if names:
            return ", ".join(names)
        return "all pooling models" if obj.endpoint == CaseEndpoint.RERANK else "all chat models"


# -- runs ----------------------------------------------------------------------------------------------------


@admin.register(CheckRun)
class CheckRunAdmin(admin.ModelAdmin):
    """Stored runs: a backend x case table with coloured outcomes and causes, a latency chart, a Markdown report."""

    list_display = ("__str__", "created_at", "trigger", "triggered_by", "status_badge", "score", "duration", "markdown")
    list_filter = ("status", "trigger")
    search_fields = ("triggered_by", "results__backend_name", "results__model_name")
    date_hierarchy = "created_at"
    change_list_template = "admin/checks/checkrun_change_list.html"
    change_form_template = "admin/checks/checkrun_change_form.html"
    readonly_fields = (
        "status_badge",
        "trigger",
        "triggered_by",
        "filters",
        "created_at",
        "started_at",
        "finished_at",
        "duration",
        "error",
        "webhook_status",
        "markdown",
    )
    fieldsets = (
        (
            "Run",
            {
                "fields": (
                    "status_badge",
                    "trigger",
                    "triggered_by",
                    "filters",
                    "created_at",
                    "started_at",
                    "finished_at",
                    "duration",
                    "error",
                    "webhook_status",
                    "markdown",
                )
            },
        ),
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: CheckRun | None = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        """The "Run checks now" (POST) and Markdown download URLs, before the default ones."""
        own = [
            path("run-now/", self.admin_site.admin_view(self.run_now_view), name="backends_checkrun_run_now"),
            path(
                "<int:object_id>/report.md",
                self.admin_site.admin_view(self.markdown_view),
                name="backends_checkrun_markdown",
            ),
        ]
        return own + super().get_urls()

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """The run's page with its report table and latency chart above the details; refreshes until finished."""
        run = self.get_object(request, object_id) if object_id else None
        context = {**(extra_context or {})}
        if run is not None:
            context["auto_refresh"] = not run.is_finished
            context["markdown_url"] = reverse("admin:backends_checkrun_markdown", args=[run.pk])
            # full width above the fieldsets: the table has a column per case
            context["headline"] = run_headline(run=run)
            context["report_table"] = self.report_table(run)
            context["latency_chart"] = self.latency_chart(run)
        return super().changeform_view(request, object_id, form_url, context)

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: CheckRun) -> str:
        return run_status_badge(obj)

    @admin.display(description="passed")
    def score(self, obj: CheckRun) -> str:
        if not obj.is_finished or not obj.total:
            return "—"
        colour = PASS_COLOUR if not obj.failed else FAIL_COLOUR
        return format_html('<b style="color:{}">{}/{}</b>', colour, obj.passed, obj.total)

    @admin.display(description="duration")
    def duration(self, obj: CheckRun) -> str:
        return "—" if obj.duration_s is None else f"{obj.duration_s:.1f} s"

    @admin.display(description="filters")
    def filters(self, obj: CheckRun) -> str:
        parts = []
        if obj.model_names:
            parts.append("models: " + ", ".join(obj.model_names))
        if obj.backend_names:
            parts.append("backends: " + ", ".join(obj.backend_names))
        return "; ".join(parts) or "all models, all backends"

    @admin.display(description="report")
    def markdown(self, obj: CheckRun) -> str:
        url = reverse("admin:backends_checkrun_markdown", args=[obj.pk])
        return format_html('<a href="{}" download>report.md</a>', url)

    def report_table(self, obj: CheckRun) -> SafeString:
        """The backend x case table with coloured outcomes, causes and measurements, then why checks failed."""
        case_names, rows = check_run_matrix(run=obj)
        if not rows:
            return mark_safe('<p style="color:#6e7781">No results yet.</p>')
        table_rows = []
        for row in rows:
            cells: list[dict[str, object] | None] = []
            for result in row.cells:
                if result is None:
                    cells.append(None)
                    continue
                cells.append(
                    {
                        "badge": result_badge(result),
                        "colour": result_colour(result),
                        "result": result,
                        "tokens": ""
                        if result.prompt_tokens is None
                        else f"{result.prompt_tokens}/{result.completion_tokens or 0}",
                    }
                )
            table_rows.append({"backend": row.backend_name, "model": row.model_name, "cells": cells})
        failures = check_failures(check_run_results(run=obj))
        return render_to_string(
            "admin/checks/report_table.html",
            {"case_names": case_names, "rows": table_rows, "failures": failures},
        )

    def latency_chart(self, obj: CheckRun) -> SafeString:
        """The run's latency per check as a bar chart."""
        return run_latency_svg(list(check_run_results(run=obj)))

    def run_now_view(self, request: HttpRequest) -> HttpResponse:
        """POST: queue a run of every enabled case on every backend and open its page."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not request.user.has_perm("backends.add_checkrun"):
            raise PermissionDenied
        run = check_run_start(trigger=RunTrigger.ADMIN, triggered_by=_who(request))
        _report_started_message(self, request, run)
        return HttpResponseRedirect(reverse("admin:backends_checkrun_change", args=[run.pk]))

    def markdown_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """The run's Markdown summary as a download."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        run = get_object_or_404(CheckRun, pk=object_id)
        response = HttpResponse(run_markdown(run=run), content_type="text/markdown; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="check-run-{run.pk}.md"'
        return response


@admin.register(CheckResult)
class CheckResultAdmin(admin.ModelAdmin):
    """Every stored check result, filterable by outcome, cause, backend, model and case."""

    list_display = (
        "run",
        "backend_name",
        "model_name",
        "case_name",
        "outcome_badge",
        "latency_ms",
        "ttft_ms",
        "prompt_tokens",
        "completion_tokens",
        "short_error",
    )
    list_filter = ("outcome", "cause", "backend_name", "model_name", "case_name")
    search_fields = ("backend_name", "model_name", "case_name", "error", "answer")
    list_select_related = ("run",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: CheckResult | None = None) -> bool:
        return False

    @admin.display(description="outcome", ordering="outcome")
    def outcome_badge(self, obj: CheckResult) -> str:
        return result_badge(obj)

    @admin.display(description="error")
    def short_error(self, obj: CheckResult) -> str:
        return obj.error if len(obj.error) <= 120 else obj.error[:119] + "…"


# -- trends and "Run checks now" on the Backend and Model pages ----------------------------------------------

TRENDS_FIELDSET = f"Checks (last {TREND_RUNS} runs)"


class _ChecksTrendMixin:
    """Adds a read-only `check_trends` field (server-drawn SVG charts) in its own fieldset on change pages."""

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        """The parent's fieldsets, plus the trends fieldset on change pages."""
        fieldsets = [
            (name, {**options, "fields": [f for f in options["fields"] if f != "check_trends"]})
            for name, options in super().get_fieldsets(request, obj)  # type: ignore[misc]
        ]
        if obj is None:
            return fieldsets
        return [*fieldsets, (TRENDS_FIELDSET, {"fields": ["check_trends"]})]

    @staticmethod
    def _trends(points: list[Any], results_url: str) -> SafeString:
        """Both charts and a link to the matching results."""
        link = format_html('<p><a href="{}">All check results</a></p>', results_url)
        return mark_safe(trend_charts_html(points) + link)


admin.site.unregister(Backend)


@admin.register(Backend)
class BackendChecksAdmin(_ChecksTrendMixin, BackendAdmin):
    """The registry's backend admin plus check trends and a "Run checks now" action."""

    readonly_fields = (*BackendAdmin.readonly_fields, "check_trends")
    actions = [*BackendAdmin.actions, "run_checks_now"]

    @admin.display(description="trends")
    def check_trends(self, obj: Backend) -> SafeString:
        """Pass rate and latency of the backend over its last 30 runs."""
        url = reverse("admin:backends_checkresult_changelist") + "?" + urlencode({"backend_name": obj.name})
        return self._trends(check_trend_for_backend(backend=obj), url)

    @admin.action(description="Run checks now")
    def run_checks_now(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        """Queue a run limited to the selected backends."""
        names = list(queryset.values_list("name", flat=True))
        run = check_run_start(trigger=RunTrigger.ADMIN, triggered_by=_who(request), backend_names=names)
        _report_started_message(self, request, run)


admin.site.unregister(ServedModel)


@admin.register(ServedModel)
class ServedModelChecksAdmin(_ChecksTrendMixin, ServedModelAdmin):
    """The registry's model admin plus check trends and a "Run checks now" action."""

    readonly_fields = (*ServedModelAdmin.readonly_fields, "check_trends")
    actions = [*ServedModelAdmin.actions, "run_checks_now"]

    @admin.display(description="trends")
    def check_trends(self, obj: ServedModel) -> SafeString:
        """Pass rate and latency of the model (all its backends) over its last 30 runs."""
        url = reverse("admin:backends_checkresult_changelist") + "?" + urlencode({"model_name": obj.name})
        return self._trends(check_trend_for_model(model=obj), url)

    @admin.action(description="Run checks now")
    def run_checks_now(self, request: HttpRequest, queryset: QuerySet[ServedModel]) -> None:
        """Queue a run limited to the selected models."""
        names = list(queryset.values_list("name", flat=True))
        run = check_run_start(trigger=RunTrigger.ADMIN, triggered_by=_who(request), model_names=names)
        _report_started_message(self, request, run)


__all__ = ["BackendChecksAdmin", "CheckCaseAdmin", "CheckResultAdmin", "CheckRunAdmin", "ServedModelChecksAdmin"]
