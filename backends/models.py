"""Registry of GPU pools, vLLM backends and the models they serve, edited by operators in admin."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from backends.validators import validate_name
from core.versions import VersionRow


class RoutingStrategy(StrEnum):
    """Names of the routing strategies a pool can use (implemented in routing.strategies)."""

    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"
    LEAST_OUTSTANDING = "least_outstanding"
    KV_CACHE_AWARE = "kv_cache_aware"
    SESSION_AFFINITY = "session_affinity"
    PREFIX_AWARE = "prefix_aware"


class BackendState(models.TextChoices):
    """Operator-chosen state of a backend."""

    ENABLED = "enabled", "Enabled"
    DRAINING = "draining", "Draining"
    DISABLED = "disabled", "Disabled"


class HealthStatus(models.TextChoices):
    """Last health status measured by a probe."""

    UNKNOWN = "unknown", "Unknown"
    HEALTHY = "healthy", "Healthy"
    DEGRADED = "degraded", "Degraded"
    UNHEALTHY = "unhealthy", "Unhealthy"


class ModelKind(models.TextChoices):
    """Which endpoints a model serves (the router's table: `routing.gateway.ENDPOINTS`, docs/api.md).

    Every kind serves /tokenize and /detokenize. Chat: chat and text completions. Completion: text completions.
    Embedding (a vLLM `--runner pooling` embedding model): /v1/embeddings, and rerank and score, which vLLM
    serves for an embedding model as a bi-encoder (the cosine similarity of the embeddings). Rerank (a
    cross-encoder such as bge-reranker or ms-marco-MiniLM, served by vLLM as a `classify` model with one label):
    rerank and score only.
    """

    CHAT = "chat", "Chat"
    COMPLETION = "completion", "Completion"
    EMBEDDING = "embedding", "Embedding (also rerank/score as a bi-encoder)"
    RERANK = "rerank", "Rerank / score (cross-encoder)"


def normalize_base_url(url: str) -> str:
    """Strip trailing slashes and a trailing `/v1`, so paths are always appended the same way."""
    url = (url or "").strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def validate_base_url(value: str) -> None:
    """An http(s) URL with a host (dot-less hosts such as Kubernetes service names are fine), no query."""
    parts = urlsplit(normalize_base_url(value))
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise ValidationError("The port is not a number between 0 and 65535.", code="invalid_url") from exc
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValidationError("Use an http:// or https:// URL with a host.", code="invalid_url")
    if parts.query or parts.fragment or any(c.isspace() for c in value.strip()):
        raise ValidationError("The base URL cannot have a query, a fragment or spaces.", code="invalid_url")


# A bearer token is sent as `Authorization: Bearer <key>`: it must be a valid HTTP header value (ASCII; no line
# break, which would end the header, nor other control character). Visible ASCII without spaces covers every key
# format in use (RFC 6750 tokens, vLLM `--api-key`, JWTs) and keeps the key one token.
_API_KEY_RE = re.compile(r"[\x21-\x7e]*")
# What a secret file or a copy-paste adds around a key: whitespace, line breaks and a UTF-8 byte-order mark.
_API_KEY_SURROUNDING = " \t\r\n\v\f\ufeff"


def normalize_api_key(value: str) -> str:
    """Strip what a secret file adds around a key (a trailing newline, a BOM, spaces); the key itself is kept."""
    return (value or "").strip(_API_KEY_SURROUNDING)


def _api_key_flaw(key: str) -> str:
    """What makes a (normalised) key unusable in a header, in words ("" when nothing does)."""
    if _API_KEY_RE.fullmatch(key):
        return ""
    if any(c in "\r\n" for c in key):
        return "a line break"
    if any(ord(c) > 0x7E for c in key):
        return "a non-ASCII character"
    if any(c in " \t" for c in key):
        return "a space"
    return "a control character"


def api_key_problem(value: str) -> str:
    """Why a backend API key cannot be sent as an HTTP header value ("" when it can). Never quotes the key."""
    flaw = _api_key_flaw(normalize_api_key(value))
    return f"the backend's API key is not a valid HTTP header value (it contains {flaw})" if flaw else ""


def validate_api_key(value: str) -> None:
    """Reject a key that cannot go into an `Authorization` header; the message never contains the key."""
    flaw = _api_key_flaw(normalize_api_key(value))
    if flaw:
        raise ValidationError(
            f"Use printable ASCII without spaces for the API key (it contains {flaw}).", code="invalid_api_key"
        )


class InvalidApiKeyError(ValueError):
    """A stored backend key cannot be sent as a header; the message names the problem, never the key."""


def bearer_headers(api_key: str) -> dict[str, str]:
    """`{"Authorization": "Bearer <key>"}` (key normalised), `{}` without a key; InvalidApiKeyError for a bad key.

    Every client that calls a backend (probe, check runner, router) builds the header here, so a key that slipped
    past validation (an old row, a raw update) fails that backend alone, with a message that holds no secret.
    """
    problem = api_key_problem(api_key)
    if problem:
        raise InvalidApiKeyError(problem)
    key = normalize_api_key(api_key)
    return {"Authorization": f"Bearer {key}"} if key else {}


class GpuPool(models.Model):
    """A group of vLLM servers (usually one GPU type or one location) that serve the same models."""

    name = models.CharField(max_length=100, unique=True, validators=[validate_name])
    description = models.TextField(blank=True)
    routing_strategy = models.CharField(
        max_length=32,
        choices=[(s.value, s.value.replace("_", " ")) for s in RoutingStrategy],
        default=RoutingStrategy.ROUND_ROBIN.value,
    )
    affinity_key = models.CharField(
        max_length=100,
        default="user",
        help_text='Session key for session affinity: "user" (the request\'s user field) or "header:<name>".',
    )
    priority_scheduling = models.BooleanField(
        default=False,
        help_text="The pool's vLLM servers run with --scheduling-policy priority: each request's priority class is "
        "sent as vLLM's `priority` (critical -10, standard 0, batch 10). Off: the field is removed from requests.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "GPU pool"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """Check that the routing strategy is one the router knows."""
        if self.routing_strategy not in {s.value for s in RoutingStrategy}:
            raise ValidationError({"routing_strategy": f"Unknown strategy {self.routing_strategy!r}."})
        key = self.affinity_key or ""
        if key != "user" and not (key.startswith("header:") and len(key) > len("header:")):
            raise ValidationError({"affinity_key": 'Use "user" or "header:<header name>".'})


# Fields only the probes and check runs write (read-only in admin and the API, never in the YAML).
HEALTH_FIELDS = frozenset({"status", "last_checked_at", "last_error", "last_latency_ms"})
MODEL_PROBE_FIELDS = frozenset({"unavailable_reason"})


def _keep_probe_fields(row: models.Model, kwargs: dict[str, Any], probe_fields: frozenset[str]) -> None:
    """Make a plain save of an existing row leave the probe-written fields as they are in the database."""
    if row._state.adding or kwargs.get("force_insert") or kwargs.get("update_fields") is not None:
        return
    kwargs["update_fields"] = [
        f.name for f in row._meta.concrete_fields if not f.primary_key and f.name not in probe_fields
    ]


class Backend(models.Model):
    """One vLLM server (an OpenAI-compatible HTTP endpoint) in a GPU pool."""

    pool = models.ForeignKey(GpuPool, on_delete=models.CASCADE, related_name="backends")
    name = models.CharField(max_length=100, unique=True, validators=[validate_name])
    base_url = models.CharField(
        max_length=500,
        validators=[validate_base_url],
        help_text="e.g. http://gpu-node-1:8000 (a trailing /v1 is removed)",
    )
    api_key = models.CharField(
        max_length=500,
        blank=True,
        validators=[validate_api_key],
        help_text="Bearer key the backend expects, if any. Write-only. Surrounding whitespace is removed.",
    )
    weight = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    max_concurrent_requests = models.PositiveIntegerField(
        default=0, help_text="In-flight requests this router sends at most; 0 means no limit."
    )
    connect_timeout_s = models.FloatField(default=5.0, validators=[MinValueValidator(0.01)])
    read_timeout_s = models.FloatField(
        default=120.0, validators=[MinValueValidator(0.01)], help_text="Longest wait for the next bytes."
    )
    state = models.CharField(max_length=16, choices=BackendState.choices, default=BackendState.ENABLED)
    # Health, written only by probes (read-only in admin).
    status = models.CharField(max_length=16, choices=HealthStatus.choices, default=HealthStatus.UNKNOWN)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    last_latency_ms = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["pool__name", "name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """Normalise the base URL and the API key (their formats are checked by the fields' validators)."""
        self.base_url = normalize_base_url(self.base_url)
        self.api_key = normalize_api_key(self.api_key)

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save with the base URL and the API key normalised, whatever path the row came in by.

        Saving an existing row (admin, API, import) never writes the health fields: they were read when the
        request began, and writing them back would undo what a probe or a check run stored meanwhile. Probes
        and checks write them with `backends.services.backend_health_write`.
        """
        self.base_url = normalize_base_url(self.base_url)
        self.api_key = normalize_api_key(self.api_key)
        _keep_probe_fields(self, kwargs, HEALTH_FIELDS)
        super().save(*args, **kwargs)

    @property
    def has_api_key(self) -> bool:
        """Whether a backend key is set (the key itself is never displayed)."""
        return bool(self.api_key)


class ServedModel(models.Model):
    """A model as clients name it, mapped to the name a pool's vLLM servers serve it under.

    Called "model" wherever people see it (admin, API, YAML); the class name keeps it apart from Django's and DRF's
    `Model*` classes (the table and the admin URL say `servedmodel`).
    """

    name = models.CharField(max_length=200, unique=True, validators=[validate_name], help_text="Public name.")
    served_name = models.CharField(
        max_length=200, blank=True, help_text="Name on the backend (vLLM --served-model-name); default: public name."
    )
    aliases = models.JSONField(default=list, blank=True, help_text="Other public names, a JSON list of strings.")
    kind = models.CharField(
        max_length=16,
        choices=ModelKind.choices,
        default=ModelKind.CHAT,
        help_text="Which endpoints the model serves: chat (chat and text completions), completion, embedding "
        "(embeddings, rerank, score) or rerank (a cross-encoder: rerank and score). Every kind serves "
        "/tokenize and /detokenize.",
    )
    pool = models.ForeignKey(GpuPool, on_delete=models.PROTECT, related_name="models")
    fallback_pools = models.ManyToManyField(GpuPool, through="ModelFallback", related_name="fallback_for", blank=True)
    max_context_length = models.PositiveIntegerField(null=True, blank=True)
    enabled = models.BooleanField(default=True)
    # Written only by health probes (read-only in admin and the API, not in YAML): why no backend serves it.
    unavailable_reason = models.CharField(
        max_length=500,
        blank=True,
        help_text="Set by the health probe when no backend of the pool lists the model at /v1/models; "
        "the router then neither lists nor routes it. Empty: served.",
    )
    split_sticky_key = models.CharField(
        max_length=100,
        blank=True,
        default="",
        help_text='Traffic split stickiness: empty, each request is drawn at random by weight; "user" (the '
        'request\'s user field) or "header:<name>" (e.g. header:x-session-id): the same key always gets the same '
        "model. Requests without the key are drawn at random.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "model"
        verbose_name_plural = "models"

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Saving an existing row (admin, API, import) leaves the probe's `unavailable_reason` as it is."""
        _keep_probe_fields(self, kwargs, MODEL_PROBE_FIELDS)
        super().save(*args, **kwargs)

    @property
    def backend_name(self) -> str:
        """The name the backend serves this model under."""
        return self.served_name or self.name

    def clean(self) -> None:
        """Check aliases are a list of valid names that collide with no other model's name or alias."""
        if not isinstance(self.aliases, list) or not all(isinstance(a, str) for a in self.aliases):
            raise ValidationError({"aliases": "Aliases must be a list of strings."})
        for alias in self.aliases:
            try:
                validate_name(alias)
            except ValidationError as exc:
                raise ValidationError({"aliases": f"{alias!r}: {exc.messages[0]}"}) from exc
        key = self.split_sticky_key or ""
        if key and key != "user" and not (key.startswith("header:") and len(key) > len("header:")):
            raise ValidationError({"split_sticky_key": 'Leave empty, or use "user" or "header:<header name>".'})
        if self.name in self.aliases or len(set(self.aliases)) != len(self.aliases):
            raise ValidationError({"aliases": "Aliases must be distinct and differ from the name."})
        taken: dict[str, str] = {}
        for other in ServedModel.objects.exclude(pk=self.pk).only("name", "aliases"):
            taken[other.name] = other.name
            for alias in other.aliases or []:
                taken[alias] = other.name
        for public in [self.name, *self.aliases]:
            if public in taken:
                field = "name" if public == self.name else "aliases"
                raise ValidationError({field: f"{public!r} is already used by model {taken[public]!r}."})


class ModelFallback(models.Model):
    """An ordered fallback pool for a model, tried when none of its own pool's backends is usable."""

    model = models.ForeignKey(ServedModel, on_delete=models.CASCADE, related_name="fallbacks")
    pool = models.ForeignKey(GpuPool, on_delete=models.CASCADE, related_name="+")
    position = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["position", "id"]
        constraints = [models.UniqueConstraint(fields=["model", "pool"], name="unique_model_fallback_pool")]

    def __str__(self) -> str:
        return f"{self.model} → {self.pool} (#{self.position})"

    def clean(self) -> None:
        """A model's own pool cannot also be its fallback."""
        if self.model_id and self.pool_id and self.model.pool_id == self.pool_id:
            raise ValidationError({"pool": "The model's own pool cannot be a fallback pool."})


class RouteKind(models.TextChoices):
    """What a model route does with a share of the model's requests."""

    SPLIT = "split", "Traffic split"
    SHADOW = "shadow", "Shadow (mirror)"


class ModelRoute(models.Model):
    """A share of a model's requests routed to (split) or mirrored to (shadow) another model.

    Split: `percent` of the requests for `model` are served by `target` instead (the remainder of 100 % stays on
    `model` itself); the client still sees the public name it asked for. Shadow: `percent` of them are also sent,
    after the answer, to `target`, whose answer is only compared with the primary's (docs/routing.md).
    """

    model = models.ForeignKey(ServedModel, on_delete=models.CASCADE, related_name="routes")
    kind = models.CharField(max_length=8, choices=RouteKind.choices)
    target = models.ForeignKey(ServedModel, on_delete=models.CASCADE, related_name="routed_from")
    percent = models.FloatField(
        validators=[MinValueValidator(0.01), MaxValueValidator(100.0)],
        help_text="Share of the model's requests, in percent (0.01 to 100).",
    )

    class Meta:
        ordering = ["kind", "target__name"]
        constraints = [models.UniqueConstraint(fields=["model", "kind", "target"], name="unique_model_route")]

    def __str__(self) -> str:
        return f"{self.model} → {self.target} ({self.percent:g} % {self.kind})"

    def clean(self) -> None:
        """A route goes to another model of the same kind."""
        if self.model_id and self.target_id:
            if self.model_id == self.target_id:
                raise ValidationError({"target": "A model cannot route to itself."})
            if self.model.kind != self.target.kind:
                raise ValidationError(
                    {"target": f"{self.target} is a {self.target.kind} model; {self.model} is a {self.model.kind} one."}
                )


def validate_split_total(percents: list[float]) -> None:
    """The shares of a model's traffic split add up to 100 % at most (the rest stays on the model)."""
    total = sum(percents)
    if total > 100.0 + 1e-9:
        raise ValidationError(f"The traffic split adds up to {total:g} %; at most 100 %.", code="split_total")


SHADOW_COUNTERS = (
    "mirrored",
    "errors",
    "dropped",
    "compared",
    "matched",
    "primary_latency_ms_sum",
    "shadow_latency_ms_sum",
    "primary_completion_tokens",
    "shadow_completion_tokens",
    "prompt_tokens_delta",
)
"""The summed fields of `ShadowComparison`, which the router's shadow tallies add to."""


class ShadowComparison(models.Model):
    """Shadow traffic compared with its primary, summed per hour and model pair (written by the router)."""

    hour = models.DateTimeField()
    primary = models.CharField(max_length=200, help_text="The model that answered the client.")
    shadow = models.CharField(max_length=200, help_text="The model the request was mirrored to.")
    mirrored = models.PositiveIntegerField(default=0, help_text="Shadow requests sent.")
    errors = models.PositiveIntegerField(default=0, help_text="Shadow requests that failed (not 200).")
    dropped = models.PositiveIntegerField(default=0, help_text="Mirrors dropped (queue full, no free slot).")
    compared = models.PositiveIntegerField(default=0, help_text="Answers at temperature 0 whose texts were compared.")
    matched = models.PositiveIntegerField(default=0, help_text="Of those, answers with the same text.")
    primary_latency_ms_sum = models.FloatField(default=0.0)
    shadow_latency_ms_sum = models.FloatField(default=0.0)
    primary_completion_tokens = models.PositiveBigIntegerField(default=0)
    shadow_completion_tokens = models.PositiveBigIntegerField(default=0)
    prompt_tokens_delta = models.BigIntegerField(default=0, help_text="Sum of shadow minus primary prompt tokens.")

    class Meta:
        ordering = ["-hour", "primary", "shadow"]
        constraints = [
            models.UniqueConstraint(fields=["hour", "primary", "shadow"], name="unique_shadow_comparison_hour_pair")
        ]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H:00} {self.primary} → {self.shadow}"


class RegistryState(VersionRow):
    """The registry's change signal: its version increases on every registry change (core.versions)."""

    def __str__(self) -> str:
        return f"registry v{self.version}"


from backends.checks.models import CheckCase, CheckResult, CheckRun  # noqa: E402,F401
