"""Governance: client API keys with model access and limits, usage records and their hourly rollups."""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from core.versions import VersionRow
from governance.priority import CHOICES as PRIORITY_CHOICES
from governance.priority import RANK, Priority

KEY_PREFIX_LENGTH = 12  # "sk-llm-" + 5 characters: enough to recognise a key, useless to guess it
MAX_QUEUE_WEIGHT = 1000


def key_hash(secret: str) -> str:
    """SHA-256 hex of a key: what is stored and what the hot path looks up (keys are random, so no salt)."""
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKey(models.Model):
    """A client's API key: stored hashed, with the models it may use and its rate limits and budget."""

    name = models.CharField(max_length=100, unique=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="api_keys"
    )
    prefix = models.CharField(max_length=20, editable=False, help_text="First characters, to recognise the key.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    allowed_models = models.JSONField(
        default=list, blank=True, help_text="Public model names (or aliases) this key may use; empty: all models."
    )
    enabled = models.BooleanField(default=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    rpm_limit = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="Requests per minute; empty: no limit."
    )
    tpm_limit = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="Tokens per minute; empty: no limit."
    )
    daily_token_budget = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="Tokens per UTC day; empty: no limit."
    )
    priority_default = models.CharField(
        max_length=16,
        choices=PRIORITY_CHOICES,
        default=Priority.STANDARD.value,
        help_text="Priority class of the key's requests that name none (x-priority header or the body's priority).",
    )
    priority_max = models.CharField(
        max_length=16,
        choices=PRIORITY_CHOICES,
        default=Priority.STANDARD.value,
        help_text="Highest class the key's requests may ask for; a request asking for more runs in this one.",
    )
    queue_weight = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_QUEUE_WEIGHT)],
        help_text="Share of a full pool's slots against other keys waiting in the same class (2: twice a key of 1).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def clean(self) -> None:
        """Allowed models must be a list of strings; the default class cannot be above the ceiling."""
        if not isinstance(self.allowed_models, list) or not all(isinstance(m, str) for m in self.allowed_models):
            raise ValidationError({"allowed_models": "A list of model names."})
        default, ceiling = self.priority_default, self.priority_max
        if default in RANK and ceiling in RANK and RANK[Priority(default)] < RANK[Priority(ceiling)]:
            raise ValidationError(
                {"priority_default": f"The default class cannot be above the key's highest class ({ceiling})."}
            )


class KeyRegistryState(VersionRow):
    """The keys' change signal: its version increases on every key change (core.versions)."""


class UsageRecord(models.Model):
    """One /v1 request: who, which model and backend, tokens, timing and outcome (written in batches)."""

    created_at = models.DateTimeField(db_index=True)
    request_id = models.CharField(max_length=64)
    key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage")
    principal = models.CharField(max_length=100, help_text="Key name, or 'master'.")
    endpoint = models.CharField(max_length=40)
    model = models.CharField(max_length=200)
    backend = models.CharField(max_length=100, blank=True)
    status = models.PositiveSmallIntegerField()
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField()
    ttft_ms = models.FloatField(null=True, blank=True, help_text="Time to first token (streams), ms.")
    stream = models.BooleanField(default=False)
    trace_id = models.CharField(
        max_length=32, null=True, blank=True, help_text="OpenTelemetry trace id (32 hex digits) when tracing is on."
    )
    queue_wait_ms = models.FloatField(
        null=True, blank=True, help_text="Time waited for a free backend slot, ms (empty: never dispatched)."
    )
    attempts = models.PositiveSmallIntegerField(default=0, help_text="Backends tried (1: no retry).")
    retry_history = models.JSONField(
        default=list, blank=True, help_text="[backend, reason] of each failed attempt, in order."
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["principal", "created_at"]),
            models.Index(fields=["model", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.principal} {self.model} {self.status}"


class UsageHourly(models.Model):
    """Usage summed per hour, key and model (rebuilt idempotently from records by a periodic task)."""

    hour = models.DateTimeField()
    principal = models.CharField(max_length=100)
    model = models.CharField(max_length=200)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0.0)

    class Meta:
        ordering = ["-hour", "principal", "model"]
        verbose_name = "hourly usage"
        verbose_name_plural = "hourly usage"
        constraints = [
            models.UniqueConstraint(fields=["hour", "principal", "model"], name="unique_usage_hour_principal_model")
        ]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H:00} {self.principal} {self.model}"

    @property
    def mean_latency_ms(self) -> float | None:
        """Average latency over the hour."""
        return self.latency_ms_sum / self.requests if self.requests else None


TTFT_BOUNDS_MS = (50, 100, 200, 350, 500, 750, 1000, 1500, 2500, 5000, 10000)
"""Upper bounds of the time-to-first-token histogram buckets of `UsageBackendBucket` (one more: above the last)."""
TTFT_COLUMNS = tuple(f"ttft_h{i}" for i in range(len(TTFT_BOUNDS_MS) + 1))
BUCKET_SECONDS = 300
"""Width of a `UsageBackendBucket` (5 minutes)."""


class UsageBackendBucket(models.Model):
    """Traffic of one backend in one 5-minute bucket, added to by the usage writer at every flush (off the request
    path); what the operations dashboard reads instead of the records. Time to first token is kept as a bounded
    histogram (`TTFT_BOUNDS_MS`), from which percentiles are interpolated. Requests that reached no backend are
    counted under the backend "". Rows older than USAGE_BACKEND_RETENTION_D are pruned by the rollup task."""

    bucket = models.DateTimeField(help_text="Start of the 5-minute bucket (UTC).")
    backend = models.CharField(max_length=100, blank=True)
    requests = models.PositiveIntegerField(default=0, help_text="Requests answered through this backend.")
    errors = models.PositiveIntegerField(default=0, help_text="Of which ended with a 5xx.")
    client_errors = models.PositiveIntegerField(default=0, help_text="Of which ended with a 4xx.")
    failed_attempts = models.PositiveIntegerField(default=0, help_text="Attempts on it that failed and were retried.")
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0.0)
    queue_wait_ms_sum = models.FloatField(default=0.0)
    ttft_count = models.PositiveIntegerField(default=0)
    ttft_ms_sum = models.FloatField(default=0.0)
    ttft_h0 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 50 ms.")
    ttft_h1 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 100 ms.")
    ttft_h2 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 200 ms.")
    ttft_h3 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 350 ms.")
    ttft_h4 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 500 ms.")
    ttft_h5 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 750 ms.")
    ttft_h6 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 1000 ms.")
    ttft_h7 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 1500 ms.")
    ttft_h8 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 2500 ms.")
    ttft_h9 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 5000 ms.")
    ttft_h10 = models.PositiveIntegerField(default=0, help_text="TTFT ≤ 10000 ms.")
    ttft_h11 = models.PositiveIntegerField(default=0, help_text="TTFT > 10000 ms.")

    class Meta:
        ordering = ["-bucket", "backend"]
        verbose_name = "backend traffic (5 min)"
        verbose_name_plural = "backend traffic (5 min)"
        constraints = [models.UniqueConstraint(fields=["bucket", "backend"], name="unique_usage_bucket_backend")]

    def __str__(self) -> str:
        return f"{self.bucket:%Y-%m-%d %H:%M} {self.backend or '(no backend)'}"

    @property
    def ttft_histogram(self) -> list[int]:
        """Counts per `TTFT_BOUNDS_MS` bucket, the overflow last."""
        return [getattr(self, name) for name in TTFT_COLUMNS]
