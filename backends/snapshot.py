"""Immutable, database-free views of the registry that the hot path reads."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BackendSnap:
    """One backend as the router sees it at a given registry version."""

    id: int
    name: str
    pool: str
    base_url: str
    api_key: str
    weight: int
    max_concurrent_requests: int
    connect_timeout_s: float
    read_timeout_s: float
    state: str
    status: str

    @property
    def usable(self) -> bool:
        """Takes new requests: enabled by the operator and not marked unhealthy by a probe."""
        return self.state == "enabled" and self.status != "unhealthy"

    def __repr__(self) -> str:
        # Never let the backend key reach a log line through a repr.
        return f"BackendSnap(name={self.name!r}, pool={self.pool!r}, base_url={self.base_url!r})"


@dataclass(frozen=True, slots=True)
class PoolSnap:
    """A pool with its backends, in a stable order."""

    name: str
    strategy: str
    enabled: bool
    backends: tuple[BackendSnap, ...]
    affinity_key: str = "user"
    priority_scheduling: bool = False  # its vLLM servers run --scheduling-policy priority: send the class


@dataclass(frozen=True, slots=True)
class ModelSnap:
    """A public model name and where it is served."""

    name: str
    served_name: str
    kind: str
    pool: str
    fallback_pools: tuple[str, ...]
    max_context_length: int | None
    created: int
    unavailable_reason: str = ""  # set by the health probe: no backend of the pool lists the model


@dataclass(frozen=True, slots=True)
class SplitSnap:
    """A model's traffic split: the models that serve its requests and their cumulative shares.

    `targets[i]` serves a request whose draw in [0, 1) is below `bounds[i]` (and at or above `bounds[i - 1]`);
    the model itself, when it keeps a share, comes first. `sticky_key` names where a request's sticky key is
    read ("user" or "header:<name>"; empty: every request is drawn at random).
    """

    model: str
    targets: tuple[ModelSnap, ...]
    bounds: tuple[float, ...]
    sticky_key: str = ""


@dataclass(frozen=True, slots=True)
class ShadowSnap:
    """A model that a share (0 to 1) of another model's requests is mirrored to."""

    target: ModelSnap
    share: float


@dataclass(frozen=True)
class RegistrySnapshot:
    """Everything the router needs to route, keyed for O(1) lookups; rebuilt whole on every change."""

    version: int
    models: dict[str, ModelSnap]  # public name and every alias -> model
    pools: dict[str, PoolSnap]
    listed_models: tuple[ModelSnap, ...] = field(default=())
    # Enabled models no backend of their pool lists (public name and aliases -> model), kept out of `models` and
    # `listed_models`: the gateway answers 404 for them as for unknown names, or, looking here, a 503 that says why.
    unavailable: dict[str, ModelSnap] = field(default_factory=dict)
    # By the model's public name (not its aliases): its traffic split, and the models its requests are mirrored to.
    splits: dict[str, SplitSnap] = field(default_factory=dict)
    shadows: dict[str, tuple[ShadowSnap, ...]] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> RegistrySnapshot:
        """A snapshot with nothing in it (before the first load)."""
        return cls(version=-1, models={}, pools={})

    def describe(self) -> str:
        """A short text for logs."""
        return f"{len(self.listed_models)} models, {len(self.pools)} pools"
