"""Reads of governance: the key snapshot and its version, usage reports."""

from __future__ import annotations

from django.conf import settings

from core.versions import version_get
from governance.models import ApiKey, KeyRegistryState
from governance.priority import Priority
from governance.snapshot import KeySnap, KeySnapshot


def key_registry_version_get() -> int:
    """The current key registry version (one single-row query; the change signal)."""
    return version_get(KeyRegistryState)


def key_snapshot_build() -> KeySnapshot:
    """Every enabled key, by hash."""
    version = key_registry_version_get()
    by_hash = {}
    for key in ApiKey.objects.filter(enabled=True):
        by_hash[key.key_hash] = KeySnap(
            id=key.pk,
            name=key.name,
            allowed_models=frozenset(key.allowed_models) if key.allowed_models else None,
            expires_at=key.expires_at.timestamp() if key.expires_at else None,
            rpm_limit=key.rpm_limit,
            tpm_limit=key.tpm_limit,
            daily_token_budget=key.daily_token_budget,
            counter_id=f"{key.pk}.{int(key.created_at.timestamp())}",
            priority_default=_priority(key.priority_default),
            priority_max=_priority(key.priority_max),
            queue_weight=max(1, key.queue_weight),
        )
    return KeySnapshot(version=version, by_hash=by_hash)


def _priority(value: str) -> Priority:
    """A stored class name (an unknown one, from a raw update, counts as the default class)."""
    try:
        return Priority(value)
    except ValueError:
        return Priority.STANDARD


def trace_url(trace_id: str | None) -> str | None:
    """The link to a trace in the operators' tracing UI (ROUTER_TRACE_LINK_TEMPLATE with `{trace_id}` replaced),
    or None without a template or a well-formed trace id (32 hex digits, so nothing else reaches the URL)."""
    template = settings.ROUTER_TRACE_LINK_TEMPLATE
    if not template or not trace_id or len(trace_id) != 32:
        return None
    if any(c not in "0123456789abcdef" for c in trace_id):
        return None
    return template.replace("{trace_id}", trace_id)
