"""Serializers of the usage API: the query (`key`, `model`, `from`, `to`, `group_by`) and the report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils import timezone
from rest_framework import serializers

GROUP_BY = ("hour", "day")
MAX_RANGE = {"hour": timedelta(days=31), "day": timedelta(days=400)}
DEFAULT_RANGE = {"hour": timedelta(hours=24), "day": timedelta(days=30)}
# Accepted dates: far enough from datetime's limits (years 1 and 9999) that the default range, rounding to the
# period and time zone conversion cannot overflow.
EARLIEST = datetime(2, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)


class BoundedDateTimeField(serializers.DateTimeField):
    """An ISO 8601 date and time between EARLIEST and LATEST (else 400, never an overflow)."""

    def to_internal_value(self, value: Any) -> datetime:
        """Parse, then refuse what lies outside the bounds; a time zone offset that overflows is invalid too."""
        try:
            parsed = super().to_internal_value(value)
            in_range = EARLIEST <= parsed < LATEST
        except OverflowError:
            in_range = False
        if not in_range:
            self.fail("out_of_range")
        return parsed

    default_error_messages = {
        "out_of_range": f"Must be between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} (UTC).",
    }


class UsageQuerySerializer(serializers.Serializer):
    """Query parameters of GET /api/usage/ (`from` and `to` are Python keywords, hence `get_fields`)."""

    key = serializers.CharField(required=False, max_length=100, help_text="Key name (or `master`).")
    model = serializers.CharField(required=False, max_length=200, help_text="Public model name.")
    group_by = serializers.ChoiceField(choices=GROUP_BY, default="hour", help_text="Period of each row (UTC).")

    def get_fields(self) -> dict[str, serializers.Field]:
        """Add `from` and `to`."""
        fields = super().get_fields()
        fields["from"] = BoundedDateTimeField(
            required=False,
            help_text="Start (ISO 8601, rounded down to the period); default: `to` - 24 h (30 d by day).",
        )
        fields["to"] = BoundedDateTimeField(required=False, help_text="End, exclusive (ISO 8601); default: now.")
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Fill the default range; `from` before `to`, the range within its limit."""
        group_by = attrs.get("group_by", "hour")
        end = attrs.get("to") or timezone.now()
        start = attrs.get("from") or end - DEFAULT_RANGE[group_by]
        if start >= end:
            raise serializers.ValidationError({"from": "Must be before `to`."})
        if end - start > MAX_RANGE[group_by]:
            raise serializers.ValidationError(
                {"from": f"The range is limited to {MAX_RANGE[group_by].days} days with group_by={group_by}."}
            )
        attrs["from"], attrs["to"], attrs["group_by"] = start, end, group_by
        return attrs


class UsageTotalsSerializer(serializers.Serializer):
    """Summed usage."""

    requests = serializers.IntegerField()
    # A declared field, popped from the class by DRF's metaclass: Serializer.errors stays the property.
    errors = serializers.IntegerField(help_text="Requests answered with a status >= 400.")  # type: ignore[assignment]
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    mean_latency_ms = serializers.FloatField(allow_null=True)


class UsageRowSerializer(UsageTotalsSerializer):
    """Usage of one period, key and model."""

    period = serializers.DateTimeField(help_text="Start of the hour or day (UTC).")
    key = serializers.CharField(help_text="Key name, or `master`.")
    model = serializers.CharField()


class UsageReportSerializer(serializers.Serializer):
    """The answer of GET /api/usage/."""

    group_by = serializers.ChoiceField(choices=GROUP_BY)
    results = UsageRowSerializer(many=True)
    totals = UsageTotalsSerializer()

    def get_fields(self) -> dict[str, serializers.Field]:
        """Add `from` and `to`."""
        fields = super().get_fields()
        fields["from"] = serializers.DateTimeField()
        fields["to"] = serializers.DateTimeField()
        return fields
