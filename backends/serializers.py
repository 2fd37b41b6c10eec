"""Management API schemas for the registry; validation runs the models' own `full_clean()`, as admin does.

These serializers are also the one definition of the registry's YAML format (backends/registry_io.py): every
writable field is a YAML key, with the type its serializer field has; write-only fields are secrets (exported
only on request); read-only fields (health, timestamps) are not configuration and stay out of the YAML.
"""

from __future__ import annotations

from typing import Any, cast

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema_serializer
from rest_framework import serializers

from backends.models import Backend, GpuPool, ModelFallback, RouteKind, ServedModel, validate_split_total
from core.drf import FullCleanMixin


def model_fallback_names(model: ServedModel) -> list[str]:
    """A model's fallback pool names in order (position), which the plain many-to-many field would lose.

    Uses `prefetch_related("fallbacks__pool")` when the queryset has it (the API and the YAML export do).
    """
    prefetched = "fallbacks" in getattr(model, "_prefetched_objects_cache", {})
    rows = model.fallbacks.all() if prefetched else model.fallbacks.select_related("pool")
    return [fb.pool.name for fb in rows]


class FallbackPoolsField(serializers.ListField):
    """A model's ordered fallback pool names: read from its ModelFallback rows, written by the serializer."""

    def get_attribute(self, instance: ServedModel) -> list[str]:
        return model_fallback_names(instance)


def model_route_entries(model: ServedModel, kind: str) -> list[dict[str, Any]]:
    """A model's routes of one kind as `{"model": <target>, "percent": <share>}`, by target name.

    Uses `prefetch_related("routes__target")` when the queryset has it (the API and the YAML export do).
    """
    prefetched = "routes" in getattr(model, "_prefetched_objects_cache", {})
    rows = model.routes.all() if prefetched else model.routes.select_related("target")
    entries = [{"model": r.target.name, "percent": r.percent} for r in rows if r.kind == kind]
    return sorted(entries, key=lambda e: e["model"])


class ModelRouteEntrySerializer(serializers.Serializer):
    """One entry of a traffic split or of the shadows: another model (public name) and a share in percent."""

    model = serializers.CharField()
    percent = serializers.FloatField(min_value=0.01, max_value=100.0)


class ModelRoutesField(serializers.ListField):
    """A model's traffic split or shadows (`kind`): a list of {model, percent}; written by the serializer."""

    child = ModelRouteEntrySerializer()

    def __init__(self, *, kind: str, **kwargs: Any) -> None:
        self.kind = kind
        super().__init__(**kwargs)

    def get_attribute(self, instance: ServedModel) -> list[dict[str, Any]]:
        return model_route_entries(instance, self.kind)

    def to_representation(self, data: Any) -> list[dict[str, Any]]:
        return [{"model": e["model"], "percent": e["percent"]} for e in data]


def route_targets_check(*, name: str, kind: str, entries: list[dict[str, Any]]) -> list[str]:
    """Problems with the entries of a model's split or shadows (other than the targets' existence)."""
    problems = []
    targets = [e["model"] for e in entries]
    if len(set(targets)) != len(targets):
        problems.append("a model is listed more than once")
    if name in targets:
        problems.append("a model cannot route to itself")
    if kind == RouteKind.SPLIT:
        try:
            validate_split_total([float(e["percent"]) for e in entries])
        except DjangoValidationError as exc:
            problems.extend(exc.messages)
    return problems


class GpuPoolSerializer(FullCleanMixin, serializers.ModelSerializer):
    """A GPU pool, with each backend's state, health and live routing figures (read-only)."""

    backends = serializers.SerializerMethodField()

    class Meta:
        model = GpuPool
        fields = [
            "id",
            "name",
            "description",
            "routing_strategy",
            "affinity_key",
            "priority_scheduling",
            "enabled",
            "backends",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]

    def get_backends(self, pool: GpuPool) -> list[dict[str, Any]]:
        """Backends of the pool with state, health, circuit, in-flight, vLLM load and latency."""
        runtime = self.context.get("runtime")
        if runtime is None:
            from backends.runtime import runtime_stats_collect

            runtime = runtime_stats_collect()
            cast(dict[str, Any], self.context)["runtime"] = runtime  # DRF's context is a dict
        out = []
        for b in pool.backends.all():
            live = runtime.get(b.name, {})
            out.append(
                {
                    "name": b.name,
                    "base_url": b.base_url,
                    "state": b.state,
                    "status": b.status,
                    "last_checked_at": b.last_checked_at,
                    "last_error": b.last_error,
                    "last_latency_ms": b.last_latency_ms,
                    "circuit": live.get("circuit", "closed"),
                    "in_flight": live.get("in_flight", 0),
                    "vllm_waiting": live.get("vllm_waiting"),
                    "vllm_running": live.get("vllm_running"),
                    "kv_cache_usage": live.get("kv_cache_usage"),
                    "engine_prefix_cache_hit_rate": live.get("engine_prefix_cache_hit_rate"),
                    "prefix_index_blocks": live.get("prefix_index_blocks"),
                    "prefix_estimated_hit_ratio": live.get("prefix_estimated_hit_ratio"),
                    "kv_events_blocks": live.get("kv_events_blocks"),
                    "latency_ms": live.get("latency_ms"),
                }
            )
        return out


class BackendSerializer(FullCleanMixin, serializers.ModelSerializer):
    """A vLLM backend; the API key is write-only, health fields are read-only."""

    pool = serializers.SlugRelatedField(slug_field="name", queryset=GpuPool.objects.all())
    api_key = serializers.CharField(write_only=True, required=False, allow_blank=True)
    has_api_key = serializers.BooleanField(read_only=True)

    class Meta:
        model = Backend
        fields = [
            "id",
            "pool",
            "name",
            "base_url",
            "api_key",
            "has_api_key",
            "weight",
            "max_concurrent_requests",
            "connect_timeout_s",
            "read_timeout_s",
            "state",
            "status",
            "last_checked_at",
            "last_error",
            "last_latency_ms",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["status", "last_checked_at", "last_error", "last_latency_ms", "created_at", "updated_at"]


@extend_schema_serializer(component_name="Model")  # the schema's name, as the API's paths: a model
class ServedModelSerializer(FullCleanMixin, serializers.ModelSerializer):
    """A public model; fallback pools are an ordered list of pool names."""

    pool = serializers.SlugRelatedField(slug_field="name", queryset=GpuPool.objects.all())
    aliases = serializers.ListField(child=serializers.CharField(), required=False)
    fallback_pools = FallbackPoolsField(child=serializers.CharField(), required=False)
    routes_given: dict[str, list[tuple[ServedModel, float]]]
    traffic_split = ModelRoutesField(kind=RouteKind.SPLIT, required=False)
    shadows = ModelRoutesField(kind=RouteKind.SHADOW, required=False)

    class Meta:
        model = ServedModel
        fields = [
            "id",
            "name",
            "served_name",
            "aliases",
            "kind",
            "pool",
            "fallback_pools",
            "max_context_length",
            "enabled",
            "split_sticky_key",
            "traffic_split",
            "shadows",
            "unavailable_reason",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["unavailable_reason", "created_at", "updated_at"]

    def validate_fallback_pools(self, value: list[str]) -> list[str]:
        """Every fallback pool must exist, once."""
        if len(set(value)) != len(value):
            raise serializers.ValidationError("Fallback pools must be distinct.")
        known = set(GpuPool.objects.filter(name__in=value).values_list("name", flat=True))
        missing = [name for name in value if name not in known]
        if missing:
            raise serializers.ValidationError(f"Unknown pool(s): {', '.join(missing)}.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        pool = attrs.get("pool") or getattr(self.instance, "pool", None)
        if pool is not None and pool.name in attrs.get("fallback_pools", []):
            raise serializers.ValidationError({"fallback_pools": "The model's own pool cannot be a fallback."})
        name = attrs.get("name") or getattr(self.instance, "name", "")
        kind = attrs.get("kind") or getattr(self.instance, "kind", "")
        for field, route_kind in (("traffic_split", RouteKind.SPLIT), ("shadows", RouteKind.SHADOW)):
            entries = attrs.get(field)
            if entries is None:
                continue
            problems = route_targets_check(name=str(name or ""), kind=route_kind, entries=entries)
            targets = {m.name: m for m in ServedModel.objects.filter(name__in=[e["model"] for e in entries])}
            for e in entries:
                target = targets.get(e["model"])
                if target is None:
                    problems.append(f"unknown model {e['model']!r}")
                elif target.kind != kind:
                    problems.append(f"{target.name} is a {target.kind} model, not {kind}")
            if problems:
                raise serializers.ValidationError({field: problems})
        return attrs

    def create(self, validated_data: dict[str, Any]) -> ServedModel:
        fallbacks = validated_data.pop("fallback_pools", [])
        self.routes_given = self._pop_routes(validated_data)
        model = super().create(validated_data)
        self._set_fallbacks(model, fallbacks)
        return model

    def update(self, instance: ServedModel, validated_data: dict[str, Any]) -> ServedModel:
        fallbacks = validated_data.pop("fallback_pools", None)
        self.routes_given = self._pop_routes(validated_data)
        model = super().update(instance, validated_data)
        if fallbacks is not None:
            self._set_fallbacks(model, fallbacks)
        return model

    @staticmethod
    def _pop_routes(validated_data: dict[str, Any]) -> dict[str, list[tuple[ServedModel, float]]]:
        """The traffic split and shadows given (by route kind), their targets resolved; the view applies them
        with `backends.services.model_routes_replace` (validated above: every target exists)."""
        routes: dict[str, list[tuple[ServedModel, float]]] = {}
        for field, kind in (("traffic_split", RouteKind.SPLIT), ("shadows", RouteKind.SHADOW)):
            entries = validated_data.pop(field, None)
            if entries is None:
                continue
            targets = {m.name: m for m in ServedModel.objects.filter(name__in=[e["model"] for e in entries])}
            routes[str(kind)] = [(targets[e["model"]], float(e["percent"])) for e in entries]
        return routes

    @staticmethod
    def _set_fallbacks(model: ServedModel, names: list[str]) -> None:
        model.fallbacks.all().delete()
        pools = {p.name: p for p in GpuPool.objects.filter(name__in=names)}
        for position, name in enumerate(names):
            ModelFallback.objects.create(model=model, pool=pools[name], position=position)
