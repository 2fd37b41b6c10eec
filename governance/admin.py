"""Admin of governance: API keys (admin_keys) and usage (read-only records, hourly rollups, the usage dashboard)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from core.admin_ui import badge
from core.svg import GREEN, RED
from governance import admin_keys  # noqa: F401
from governance.charts import hbars_svg, lines_svg, stacked_bars_svg
from governance.models import UsageBackendBucket, UsageHourly, UsageRecord
from governance.selectors import trace_url
from governance.usage import UsageRow, usage_report, usage_totals

WINDOWS: dict[str, tuple[str, str, int]] = {  # name: (label, period, number of periods)
    "24h": ("last 24 hours", "hour", 24),
    "7d": ("last 7 days", "day", 7),
}
ORANGE, GREY = "#b35900", "#6e7781"


def status_badge(status: int) -> str:
    """A status code coloured green (2xx), orange (4xx) or red (5xx)."""
    colour = GREEN if status < 400 else (ORANGE if status < 500 else RED)
    return badge(str(status), colour)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the platform: viewable, never added, changed or deleted here."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class StatusClassFilter(admin.SimpleListFilter):
    """Records by outcome: success, client errors, rate limited, client gone, server errors."""

    title = "outcome"
    parameter_name = "outcome"
    CLASSES: dict[str, tuple[str, Q]] = {
        "2xx": ("2xx success", Q(status__lt=300)),
        "4xx": ("4xx client error", Q(status__gte=400, status__lt=499) & ~Q(status=429)),
        "429": ("429 rate limited / busy", Q(status=429)),
        "499": ("499 client went away", Q(status=499)),
        "5xx": ("5xx server error", Q(status__gte=500)),
    }

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(value, label) for value, (label, _) in self.CLASSES.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> QuerySet[UsageRecord]:
        chosen = self.CLASSES.get(self.value() or "")
        return queryset.filter(chosen[1]) if chosen else queryset


class RetriedFilter(admin.SimpleListFilter):
    """Records whose request was retried on another backend (or not)."""

    title = "retried"
    parameter_name = "retried"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "Retried"), ("no", "Not retried")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> QuerySet[UsageRecord]:
        if self.value() == "yes":
            return queryset.filter(attempts__gt=1)
        if self.value() == "no":
            return queryset.filter(attempts__lte=1)
        return queryset


class TracedFilter(admin.SimpleListFilter):
    """Records that carry a trace id (tracing was on and the request sampled)."""

    title = "traced"
    parameter_name = "traced"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "With a trace"), ("no", "Without")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> QuerySet[UsageRecord]:
        if self.value() == "yes":
            return queryset.exclude(trace_id__isnull=True).exclude(trace_id="")
        if self.value() == "no":
            return queryset.filter(Q(trace_id__isnull=True) | Q(trace_id=""))
        return queryset


def trace_link(trace_id: str | None, *, short: bool = False) -> str:
    """The trace id (its first 8 digits when `short`, the whole one on hover), linked to the tracing UI when
    ROUTER_TRACE_LINK_TEMPLATE is set."""
    if not trace_id:
        return "—"
    text = f"{trace_id[:8]}…" if short else trace_id
    url = trace_url(trace_id)
    if url is None:
        return format_html('<code class="trace-id" title="{}">{}</code>', trace_id, text)
    return format_html(
        '<a class="trace-link" href="{}" title="{}" target="_blank" rel="noopener noreferrer"><code>{}</code> ↗</a>',
        url,
        trace_id,
        text,
    )


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    """The request log: one row per /v1 request, written in batches by the web processes.

    Search: a request id or trace id (exact, fast), a key name, a model or a backend (contains), or a status code.
    """

    change_list_template = "admin/governance/usage_change_list.html"
    list_display = (
        "created",
        "request_id",
        "principal",
        "model",
        "backend",
        "status_display",
        "tokens",
        "latency",
        "ttft",
        "queue_wait",
        "attempts",
        "trace_short",
    )
    list_display_links = ("created", "request_id")
    list_filter = (
        StatusClassFilter,
        "status",
        RetriedFilter,
        TracedFilter,
        "stream",
        "endpoint",
        "principal",
        "model",
        "backend",
    )
    search_fields = ("=request_id", "=trace_id", "principal", "model", "backend")
    search_help_text = "A request id or trace id (exact), a key name, model or backend, or a status code (e.g. 502)."
    date_hierarchy = "created_at"
    show_full_result_count = False
    list_per_page = 100
    fieldsets = (
        (None, {"fields": ("created_at", "request_id", "trace", "principal", "key", "endpoint", "model", "backend")}),
        ("Outcome", {"fields": ("status_display", "stream", "prompt_tokens", "completion_tokens")}),
        ("Timing", {"fields": ("latency", "ttft", "queue_wait")}),
        ("Retries", {"fields": ("attempts", "retries")}),
    )
    readonly_fields = ("status_display", "trace", "latency", "ttft", "queue_wait", "retries")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[UsageRecord], search_term: str
    ) -> tuple[QuerySet[UsageRecord], bool]:
        """The text fields, plus the status when the term is a three-digit code."""
        term = search_term.strip()
        results, may_have_duplicates = super().get_search_results(request, queryset, term)
        if len(term) == 3 and term.isdigit():
            results = results | queryset.filter(status=int(term))
        return results, may_have_duplicates

    @admin.display(description="status", ordering="status")
    def status_display(self, obj: UsageRecord) -> str:
        return status_badge(obj.status)

    @admin.display(description="finished (UTC)", ordering="created_at")
    def created(self, obj: UsageRecord) -> str:
        return obj.created_at.astimezone(UTC).strftime("%m-%d %H:%M:%S")

    @admin.display(description="tokens (in / out)")
    def tokens(self, obj: UsageRecord) -> str:
        return f"{obj.prompt_tokens} / {obj.completion_tokens}"

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, obj: UsageRecord) -> str:
        return f"{obj.latency_ms:.0f} ms"

    @admin.display(description="TTFT", ordering="ttft_ms")
    def ttft(self, obj: UsageRecord) -> str:
        return "—" if obj.ttft_ms is None else f"{obj.ttft_ms:.0f} ms"

    @admin.display(description="queue wait", ordering="queue_wait_ms")
    def queue_wait(self, obj: UsageRecord) -> str:
        return "—" if obj.queue_wait_ms is None else f"{obj.queue_wait_ms:.0f} ms"

    @admin.display(description="trace")
    def trace(self, obj: UsageRecord) -> str:
        return trace_link(obj.trace_id)

    @admin.display(description="trace")
    def trace_short(self, obj: UsageRecord) -> str:
        return trace_link(obj.trace_id, short=True)

    @admin.display(description="retry history")
    def retries(self, obj: UsageRecord) -> str:
        history = [item for item in obj.retry_history or [] if isinstance(item, list) and len(item) == 2]
        if not history:
            return "—"
        return format_html(
            '<ol class="retry-history">{}</ol>',
            format_html_join("", "<li><b>{}</b>: {}</li>", ((b, r.replace("_", " ")) for b, r in history)),
        )


@admin.register(UsageBackendBucket)
class UsageBackendBucketAdmin(ReadOnlyAdmin):
    """Per-backend traffic in 5-minute buckets, summed by the usage writer; what the operations dashboard reads."""

    list_display = ("bucket", "backend", "requests", "errors", "client_errors", "failed_attempts", "ttft_count")
    list_filter = ("backend",)
    date_hierarchy = "bucket"
    show_full_result_count = False


@admin.register(UsageHourly)
class UsageHourlyAdmin(ReadOnlyAdmin):
    """Usage per hour, key and model (rebuilt every 10 minutes), and the usage dashboard."""

    change_list_template = "admin/governance/usage_change_list.html"
    list_display = ("hour", "principal", "model", "requests", "errors", "prompt_tokens", "completion_tokens", "latency")
    list_filter = ("principal", "model")
    date_hierarchy = "hour"
    show_full_result_count = False

    @admin.display(description="mean latency")
    def latency(self, obj: UsageHourly) -> str:
        mean = obj.mean_latency_ms
        return "—" if mean is None else f"{mean:.0f} ms"

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "dashboard/",
                self.admin_site.admin_view(self.dashboard_view),
                name="governance_usage_dashboard",
            )
        ]
        return own + super().get_urls()

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """Per-key and per-model usage tables and charts for the last 24 h or 7 d (`?window=`)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        window = request.GET.get("window", "24h")
        if window not in WINDOWS:
            window = "24h"
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Usage, {WINDOWS[window][0]}",
            "window": window,
            "windows": [(name, label) for name, (label, _, _) in WINDOWS.items()],
            **usage_dashboard(window=window, now=timezone.now()),
        }
        return TemplateResponse(request, "admin/governance/usage_dashboard.html", context)


def _periods(window: str, now: datetime) -> tuple[str, list[datetime]]:
    """The window's period ("hour" or "day") and the start of each of its periods, the current one last."""
    _, period, count = WINDOWS[window]
    now = now.astimezone(UTC)
    if period == "hour":
        last = now.replace(minute=0, second=0, microsecond=0)
        return period, [last - timedelta(hours=i) for i in range(count - 1, -1, -1)]
    last = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return period, [last - timedelta(days=i) for i in range(count - 1, -1, -1)]


def usage_dashboard(*, window: str, now: datetime) -> dict[str, Any]:
    """Tables and charts of the window: totals, per period, per key, per model."""
    period, starts = _periods(window, now)
    start, end = starts[0], now
    series = {
        row.period: row for row in usage_report(start=start, end=end, group_by=period, by_key=False, by_model=False)
    }
    by_key = usage_report(start=start, end=end, group_by="total", by_model=False)
    by_model = usage_report(start=start, end=end, group_by="total", by_key=False)
    by_key.sort(key=lambda r: -r.requests)
    by_model.sort(key=lambda r: -r.requests)
    labels = [s.strftime("%H:00") if period == "hour" else s.strftime("%a %d") for s in starts]
    points = [series.get(s) or UsageRow(s, None, None) for s in starts]
    charts: list[SafeString] = []
    if points and any(p.requests for p in points):
        charts = [
            mark_safe(  # built from escaped parts
                stacked_bars_svg(
                    labels,
                    [
                        ("ok", GREEN, [float(p.requests - p.errors) for p in points]),
                        ("errors", RED, [float(p.errors) for p in points]),
                    ],
                    f"Requests per {period}",
                )
            ),
            mark_safe(
                lines_svg(
                    labels,
                    [
                        ("prompt", "#0969da", [float(p.prompt_tokens) for p in points]),
                        ("completion", ORANGE, [float(p.completion_tokens) for p in points]),
                    ],
                    f"Tokens per {period}",
                )
            ),
            mark_safe(
                lines_svg(labels, [("mean", GREY, [p.mean_latency_ms or 0.0 for p in points])], "Mean latency (ms)")
            ),
            hbars_svg([(r.key or "", float(r.requests), float(r.errors)) for r in by_key[:15]], "Requests per key"),
            hbars_svg(
                [(r.model or "(none)", float(r.total_tokens), 0.0) for r in by_model[:15]], "Tokens per model", ""
            ),
        ]
    return {
        "start": start,
        "end": end,
        "totals": usage_totals(by_key),
        "by_key": by_key,
        "by_model": by_model,
        "charts": charts,
        "records_url": reverse("admin:governance_usagerecord_changelist"),
    }
