"""Django admin for the registry: saving here is the normal way operators change routing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from backends.models import (
    Backend,
    BackendState,
    GpuPool,
    HealthStatus,
    ModelFallback,
    ModelRoute,
    RouteKind,
    ServedModel,
    ShadowComparison,
    validate_base_url,
    validate_split_total,
)
from backends.selectors import shadow_comparison_summary
from backends.services import backend_probe_many, backend_state_set
from core.admin_ui import badge

STATUS_COLOURS: dict[str, str] = {
    HealthStatus.HEALTHY: "#1a7f37",
    HealthStatus.DEGRADED: "#b35900",
    HealthStatus.UNHEALTHY: "#cf222e",
    HealthStatus.UNKNOWN: "#6e7781",
}
STATE_COLOURS: dict[str, str] = {
    BackendState.ENABLED: "#1a7f37",
    BackendState.DRAINING: "#b35900",
    BackendState.DISABLED: "#6e7781",
}


class BackendForm(forms.ModelForm):
    """Backend form whose API key is write-only: never rendered back, kept when left blank."""

    api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave blank to keep the current key.",
    )
    clear_api_key = forms.BooleanField(required=False, help_text="Remove the stored key.")
    base_url = forms.CharField(
        max_length=500,
        validators=[validate_base_url],
        help_text="e.g. http://gpu-node-1:8000 (a trailing /v1 is removed)",
    )

    class Meta:
        model = Backend
        fields = "__all__"

    def clean_api_key(self) -> str:
        """Keep the stored key unless a new one is typed (or clearing is asked for)."""
        typed = self.cleaned_data.get("api_key", "")
        if self.data.get(self.add_prefix("clear_api_key")):
            return ""
        if not typed and self.instance.pk:
            return self.instance.api_key
        return typed


class BackendInline(admin.TabularInline):
    """Backends listed on their pool's page."""

    model = Backend
    form = BackendForm
    extra = 0
    fields = ("name", "base_url", "state", "weight", "max_concurrent_requests", "status_badge", "last_checked_at")
    readonly_fields = ("status_badge", "last_checked_at")
    show_change_link = True

    @admin.display(description="health")
    def status_badge(self, obj: Backend) -> str:
        return badge(obj.get_status_display(), STATUS_COLOURS.get(obj.status, "#6e7781"))


CIRCUIT_COLOURS: dict[str, str] = {"closed": "#1a7f37", "half_open": "#b35900", "open": "#cf222e"}


def _runtime() -> dict[str, dict[str, Any]]:
    from backends.runtime import runtime_stats_collect

    return runtime_stats_collect()


def _fmt(value: Any, pattern: str = "{}") -> str:
    return "–" if value is None else pattern.format(value)


@admin.register(GpuPool)
class GpuPoolAdmin(admin.ModelAdmin):
    """Pools with their backends inline, and a live view of each backend's routing state."""

    list_display = (
        "name",
        "routing_strategy",
        "priority_scheduling",
        "enabled",
        "backend_count",
        "healthy_count",
        "updated_at",
    )
    list_filter = ("enabled", "routing_strategy")
    search_fields = ("name", "description")
    inlines = [BackendInline]
    actions = ["check_health", "drain_pool", "undrain_pool"]
    readonly_fields = ("live_backends",)
    fields = (
        "name",
        "description",
        "routing_strategy",
        "affinity_key",
        "priority_scheduling",
        "enabled",
        "live_backends",
    )

    @admin.display(description="backends now")
    def live_backends(self, obj: GpuPool) -> str:
        """State, circuit, health, in-flight and queued requests, KV-cache use and latency of each backend."""
        if obj.pk is None:
            return "–"
        runtime = _runtime()
        rows = []
        for b in obj.backends.order_by("name"):
            live = runtime.get(b.name, {})
            circuit = str(live.get("circuit", "closed"))
            kv = live.get("kv_cache_usage")
            rows.append(
                format_html(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
                    "<td>{}</td><td>{}</td></tr>",
                    b.name,
                    badge(b.get_state_display(), STATE_COLOURS.get(b.state, "#6e7781")),
                    badge(circuit.replace("_", "-"), CIRCUIT_COLOURS.get(circuit, "#6e7781")),
                    badge(b.get_status_display(), STATUS_COLOURS.get(b.status, "#6e7781")),
                    live.get("in_flight", 0),
                    _fmt(live.get("vllm_waiting"), "{:g}"),
                    "–" if kv is None else f"{kv * 100:.0f} %",
                    _prefix_index(live),
                    _ratio(live.get("engine_prefix_cache_hit_rate")),
                    _fmt(live.get("latency_ms") or b.last_latency_ms, "{:.0f} ms"),
                )
            )
        header = (
            "<tr><th>backend</th><th>state</th><th>circuit</th><th>health</th><th>in flight</th>"
            "<th>vLLM waiting</th><th>KV cache</th><th>prefix index (est. hits)</th><th>engine prefix hits</th>"
            "<th>latency</th></tr>"
        )
        return format_html('<table class="live-backends">{}{}</table>', mark_safe(header), mark_safe("".join(rows)))

    def get_queryset(self, request: HttpRequest) -> QuerySet[GpuPool]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                _backends=Count("backends", distinct=True),
                _healthy=Count("backends", filter=Q(backends__status=HealthStatus.HEALTHY), distinct=True),
            )
        )

    @admin.display(description="backends", ordering="_backends")
    def backend_count(self, obj: GpuPool) -> int:
        return obj._backends  # type: ignore[attr-defined]

    @admin.display(description="healthy", ordering="_healthy")
    def healthy_count(self, obj: GpuPool) -> int:
        return obj._healthy  # type: ignore[attr-defined]

    @admin.action(description="Check health now (all backends of the pool)")
    def check_health(self, request: HttpRequest, queryset: QuerySet[GpuPool]) -> None:
        _report_probes(self, request, Backend.objects.filter(pool__in=queryset).select_related("pool"))

    @admin.action(description="Drain (all backends of the pool)")
    def drain_pool(self, request: HttpRequest, queryset: QuerySet[GpuPool]) -> None:
        count = backend_state_set(
            backends=Backend.objects.filter(pool__in=queryset, state=BackendState.ENABLED), state=BackendState.DRAINING
        )
        self.message_user(request, f"{count} backend(s) draining: they take no new requests.")

    @admin.action(description="Undrain (all backends of the pool)")
    def undrain_pool(self, request: HttpRequest, queryset: QuerySet[GpuPool]) -> None:
        count = backend_state_set(
            backends=Backend.objects.filter(pool__in=queryset, state=BackendState.DRAINING), state=BackendState.ENABLED
        )
        self.message_user(request, f"{count} backend(s) back in rotation.")


@admin.register(Backend)
class BackendAdmin(admin.ModelAdmin):
    """vLLM servers; health fields are read-only and written by probes."""

    form = BackendForm
    list_display = (
        "name",
        "pool",
        "base_url",
        "state_badge",
        "status_badge",
        "in_flight",
        "last_latency_ms",
        "last_checked_at",
        "weight",
    )
    list_filter = ("pool", "state", "status")
    search_fields = ("name", "base_url", "pool__name")
    list_select_related = ("pool",)
    readonly_fields: ClassVar[tuple[str, ...]] = (
        "status",
        "last_checked_at",
        "last_error",
        "last_latency_ms",
        "key_set",
        "created_at",
        "updated_at",
    )
    actions = ["check_health", "drain", "undrain", "disable"]
    fieldsets = (
        (None, {"fields": ("pool", "name", "base_url", "state")}),
        ("Credentials", {"fields": ("key_set", "api_key", "clear_api_key")}),
        ("Limits", {"fields": ("weight", "max_concurrent_requests", "connect_timeout_s", "read_timeout_s")}),
        ("Health (written by probes)", {"fields": ("status", "last_checked_at", "last_latency_ms", "last_error")}),
        ("History", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        self._live = _runtime()  # one collection per page, not per row
        return super().changelist_view(request, extra_context)

    @admin.display(description="in flight")
    def in_flight(self, obj: Backend) -> int:
        live = getattr(self, "_live", None)
        if live is None:
            live = _runtime()
        return int(live.get(obj.name, {}).get("in_flight", 0))

    def has_delete_permission(self, request: HttpRequest, obj: Backend | None = None) -> bool:
        """A backend can be removed only once nothing is in flight on it (drain it first)."""
        if obj is not None and _runtime().get(obj.name, {}).get("in_flight", 0):
            return False
        return super().has_delete_permission(request, obj)

    @admin.display(description="API key set", boolean=True)
    def key_set(self, obj: Backend) -> bool:
        return obj.has_api_key

    @admin.display(description="state", ordering="state")
    def state_badge(self, obj: Backend) -> str:
        return badge(obj.get_state_display(), STATE_COLOURS.get(obj.state, "#6e7781"))

    @admin.display(description="health", ordering="status")
    def status_badge(self, obj: Backend) -> str:
        pill = badge(obj.get_status_display(), STATUS_COLOURS.get(obj.status, "#6e7781"))
        if obj.last_error:
            return format_html('{} <span title="{}">ⓘ</span>', pill, obj.last_error)
        return pill

    @admin.action(description="Check health now")
    def check_health(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        _report_probes(self, request, queryset.select_related("pool"))

    @admin.action(description="Drain (finish open requests, take no new ones)")
    def drain(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        count = backend_state_set(backends=queryset.filter(state=BackendState.ENABLED), state=BackendState.DRAINING)
        self.message_user(request, f"{count} backend(s) draining.")

    @admin.action(description="Undrain (back in rotation)")
    def undrain(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        count = backend_state_set(backends=queryset.exclude(state=BackendState.ENABLED), state=BackendState.ENABLED)
        self.message_user(request, f"{count} backend(s) enabled.")

    @admin.action(description="Disable")
    def disable(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        count = backend_state_set(backends=queryset, state=BackendState.DISABLED)
        self.message_user(request, f"{count} backend(s) disabled.")


def _report_probes(model_admin: admin.ModelAdmin, request: HttpRequest, backends: QuerySet[Backend]) -> None:
    results = backend_probe_many(backends=backends)
    healthy = [r for r in results if r.status == HealthStatus.HEALTHY]
    model_admin.message_user(request, f"Probed {len(results)} backend(s): {len(healthy)} healthy.")
    for result in results:
        if result.status != HealthStatus.HEALTHY:
            model_admin.message_user(request, f"{result.backend}: {result.error}", level=messages.WARNING)


class ModelFallbackInline(admin.TabularInline):
    """Ordered fallback pools of a model."""

    model = ModelFallback
    extra = 0
    fields = ("position", "pool")


class ModelRouteFormSet(forms.BaseInlineFormSet):
    """A model's routes; the split's shares (the rows kept) add up to 100 % at most."""

    def clean(self) -> None:
        super().clean()
        percents = [
            form.cleaned_data["percent"]
            for form in self.forms
            if form.cleaned_data
            and not form.cleaned_data.get("DELETE")
            and form.cleaned_data.get("kind") == RouteKind.SPLIT
            and form.cleaned_data.get("percent") is not None
        ]
        try:
            validate_split_total(percents)
        except ValidationError as exc:
            raise forms.ValidationError(exc.messages) from exc


class ModelRouteInline(admin.TabularInline):
    """Traffic split (canary) and shadow targets of a model, edited on its page; effective within seconds."""

    model = ModelRoute
    fk_name = "model"
    formset = ModelRouteFormSet
    extra = 0
    fields = ("kind", "target", "percent")
    verbose_name = "traffic split or shadow"
    verbose_name_plural = (
        "Traffic split and shadow: a split serves that share of the requests with the target model (the rest stays "
        "on this model); a shadow mirrors that share to it, off the request path, for comparison"
    )


class ServedModelAdminForm(forms.ModelForm):
    """The model form; aliases edited as a comma-separated list."""

    aliases = forms.CharField(required=False, help_text="Comma-separated other public names.")

    class Meta:
        model = ServedModel
        fields = "__all__"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["aliases"] = ", ".join(self.instance.aliases or [])

    def clean_aliases(self) -> list[str]:
        """Split the comma-separated aliases."""
        raw = self.cleaned_data.get("aliases") or ""
        return [a.strip() for a in raw.split(",") if a.strip()]


class ServedFilter(admin.SimpleListFilter):
    """Filter models by the health probe's verdict: listed by a backend of their pool or not."""

    title = "served"
    parameter_name = "served"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "Served"), ("no", "Not served")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[ServedModel]) -> QuerySet[ServedModel]:
        if self.value() == "yes":
            return queryset.filter(unavailable_reason="")
        if self.value() == "no":
            return queryset.exclude(unavailable_reason="")
        return queryset


@admin.register(ServedModel)
class ServedModelAdmin(admin.ModelAdmin):
    """Public model names and where they are served."""

    form = ServedModelAdminForm
    list_display = (
        "name",
        "served_name",
        "kind",
        "pool",
        "enabled",
        "served_badge",
        "max_context_length",
        "alias_list",
    )
    list_filter = ("kind", "pool", "enabled", ServedFilter)
    search_fields = ("name", "served_name")
    list_select_related = ("pool",)
    readonly_fields: ClassVar[tuple[str, ...]] = ("unavailable_reason", "shadow_comparison")
    actions: list[str] = []
    inlines = [ModelFallbackInline, ModelRouteInline]

    @admin.display(description="shadow comparison (last 24 h)")
    def shadow_comparison(self, obj: ServedModel) -> str:
        """This model's shadow traffic compared with its answers, per shadow model, over the last day."""
        if not obj.pk:
            return "–"
        rows = shadow_comparison_summary(since=timezone.now() - timedelta(hours=24), primary=obj.name)
        if not rows:
            return "No shadow traffic in the last 24 h."
        return format_html_join(
            mark_safe("<br>"),
            "→ {}: {} mirrored, {} errors, {} dropped; text match {} of {} compared; latency ×{}; "
            "completion tokens {} per answer",
            (
                (
                    r["shadow"],
                    r["mirrored"],
                    r["errors"],
                    r["dropped"],
                    _percent(r["match_ratio"]),
                    r["compared"],
                    _figure(r["latency_ratio"], "{:.2f}"),
                    _figure(r["completion_tokens_delta"], "{:+.1f}"),
                )
                for r in rows
            ),
        )

    @admin.display(description="aliases")
    def alias_list(self, obj: ServedModel) -> str:
        return ", ".join(obj.aliases or [])

    @admin.display(description="served", ordering="unavailable_reason")
    def served_badge(self, obj: ServedModel) -> str:
        """Whether a backend of the pool lists the model (the health probe's verdict), with the reason if not."""
        if not obj.unavailable_reason:
            return badge("served", STATUS_COLOURS[HealthStatus.HEALTHY])
        return format_html(
            "{} <small>{}</small>", badge("not served", STATUS_COLOURS[HealthStatus.UNHEALTHY]), obj.unavailable_reason
        )


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def _figure(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


@admin.register(ShadowComparison)
class ShadowComparisonAdmin(admin.ModelAdmin):
    """Shadow traffic compared with its primary, per hour and model pair (written by the router; read-only)."""

    list_display = (
        "hour",
        "primary",
        "shadow",
        "mirrored",
        "errors",
        "dropped",
        "match",
        "latency_ratio",
        "completion_tokens_delta",
        "prompt_tokens_delta_mean",
    )
    list_filter = ("primary", "shadow")
    date_hierarchy = "hour"
    search_fields = ("primary", "shadow")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ShadowComparison | None = None) -> bool:
        return False

    @admin.display(description="text match (temperature 0)")
    def match(self, obj: ShadowComparison) -> str:
        if not obj.compared:
            return "–"
        return f"{_percent(obj.matched / obj.compared)} of {obj.compared}"

    @admin.display(description="latency shadow / primary")
    def latency_ratio(self, obj: ShadowComparison) -> str:
        if not obj.primary_latency_ms_sum:
            return "–"
        return f"×{obj.shadow_latency_ms_sum / obj.primary_latency_ms_sum:.2f}"

    @admin.display(description="completion tokens Δ / answer")
    def completion_tokens_delta(self, obj: ShadowComparison) -> str:
        ok = obj.mirrored - obj.errors
        if ok <= 0:
            return "–"
        return f"{(obj.shadow_completion_tokens - obj.primary_completion_tokens) / ok:+.1f}"

    @admin.display(description="prompt tokens Δ / answer")
    def prompt_tokens_delta_mean(self, obj: ShadowComparison) -> str:
        ok = obj.mirrored - obj.errors
        return "–" if ok <= 0 else f"{obj.prompt_tokens_delta / ok:+.1f}"


def _ratio(value: object) -> str:
    return "–" if not isinstance(value, int | float) else f"{value * 100:.0f} %"


def _prefix_index(live: dict) -> str:
    """Blocks in the router's prefix index of a backend and its estimated hit ratio (prefix_aware pools)."""
    blocks = live.get("prefix_index_blocks")
    if blocks is None:
        return "–"
    text = f"{blocks:,} blocks ({_ratio(live.get('prefix_estimated_hit_ratio'))})"
    events = live.get("kv_events_blocks")
    return text if events is None else f"{text}; engine events: {events:,} blocks"
