"""Governance: client API keys with model access and limits, usage records and their hourly rollups."""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

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


class KeyRegistryState(models.Model):
    """A single row whose version increases on every key change: the web processes' reload signal."""

    version = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)


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
    ttft_ms = models.FloatField(null=True, blank=True)
    stream = models.BooleanField(default=False)

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
