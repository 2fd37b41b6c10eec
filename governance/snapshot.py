"""Immutable, database-free view of API keys for the hot path."""

from __future__ import annotations

from dataclasses import dataclass

from governance.priority import Priority


@dataclass(frozen=True, slots=True)
class KeySnap:
    """One enabled API key as the router sees it."""

    id: int
    name: str
    allowed_models: frozenset[str] | None  # None: every model
    expires_at: float | None  # epoch seconds
    rpm_limit: int | None
    tpm_limit: int | None
    daily_token_budget: int | None
    counter_id: str = ""  # rate-limit counters' key: id plus creation time, never reused by another key
    priority_default: Priority = Priority.STANDARD
    priority_max: Priority = Priority.STANDARD
    queue_weight: int = 1

    @property
    def bucket(self) -> str:
        """The name of this key's rate-limit counters."""
        return self.counter_id or str(self.id)

    @property
    def limited(self) -> bool:
        """Whether any rate limit or budget applies."""
        return bool(self.rpm_limit or self.tpm_limit or self.daily_token_budget)

    def may_use(self, *names: str) -> bool:
        """Whether the key may use a model known by any of these names (public name or alias)."""
        return self.allowed_models is None or any(n in self.allowed_models for n in names)


@dataclass(frozen=True)
class KeySnapshot:
    """Enabled keys by the SHA-256 of their secret."""

    version: int
    by_hash: dict[str, KeySnap]

    @classmethod
    def empty(cls) -> KeySnapshot:
        """Before the first load."""
        return cls(version=-1, by_hash={})

    def describe(self) -> str:
        """A short text for logs."""
        return f"{len(self.by_hash)} keys"
