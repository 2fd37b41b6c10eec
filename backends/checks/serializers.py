"""Management API schemas of check runs: what starting a run accepts, what reading one returns."""

from __future__ import annotations

from typing import Any, cast

from rest_framework import serializers

from backends.checks.models import CheckResult, CheckRun
from backends.checks.selectors import CheckFilterError, check_filters_validate


class _NamesField(serializers.ListField):
    """A list of names that also accepts a single name."""

    child = serializers.CharField(max_length=200)

    def to_internal_value(self, data: Any) -> list[str]:
        """Wrap a single name in a list."""
        return super().to_internal_value([data] if isinstance(data, str) else data)


class CheckRunStartSerializer(serializers.Serializer):
    """POST /api/check-runs/: optionally limit the run to models and/or backends (a name or a list of names)."""

    model = _NamesField(required=False, default=list)
    backend = _NamesField(required=False, default=list)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Every named model and backend must exist."""
        try:
            check_filters_validate(model_names=attrs["model"], backend_names=attrs["backend"])
        except CheckFilterError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        return attrs


class CheckResultSerializer(serializers.ModelSerializer):
    """One check: backend x model x case, outcome, cause and measurements."""

    backend = serializers.CharField(source="backend_name")
    model = serializers.CharField(source="model_name")
    case = serializers.CharField(source="case_name")

    class Meta:
        model = CheckResult
        fields = [
            "backend",
            "model",
            "case",
            "outcome",
            "cause",
            "error",
            "answer",
            "finish_reason",
            "latency_ms",
            "ttft_ms",
            "prompt_tokens",
            "completion_tokens",
            "http_status",
        ]


class CheckRunSerializer(serializers.ModelSerializer):
    """A run's summary."""

    duration_s = serializers.FloatField(read_only=True)

    class Meta:
        model = CheckRun
        fields = [
            "id",
            "status",
            "trigger",
            "triggered_by",
            "model_names",
            "backend_names",
            "created_at",
            "started_at",
            "finished_at",
            "duration_s",
            "total",
            "passed",
            "failed",
            "error",
            "webhook_status",
        ]
        read_only_fields = fields


class CheckRunDetailSerializer(CheckRunSerializer):
    """A run with all its results."""

    results = serializers.SerializerMethodField()

    class Meta(CheckRunSerializer.Meta):
        fields = [*CheckRunSerializer.Meta.fields, "results"]
        read_only_fields = fields

    def get_results(self, run: CheckRun) -> list[dict[str, Any]]:
        """The run's results, ordered backend, model, case."""
        from backends.checks.selectors import check_run_results

        return cast(list[dict[str, Any]], CheckResultSerializer(check_run_results(run=run), many=True).data)
