"""Priority classes: a small fixed set, a key's default and ceiling, and the request's own choice within it.

`critical` > `standard` > `batch`. A request names its class with the `x-priority` header or the body's `priority`
(a class name, or vLLM's integer: below 0 is critical, 0 standard, above 0 batch); the header wins, as vLLM's own
`X-Vllm-Priority` header wins over its body field. A request above its key's ceiling is lowered to the ceiling
(clamped, not refused: the answer's `x-priority` header says which class served it). The class decides the request's
place in a full pool's admission queue (routing.fairqueue) and, for pools whose vLLM servers run the priority
scheduler (`GpuPool.priority_scheduling`), the `priority` vLLM receives (VLLM_PRIORITY).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from core.errors import APIError


class Priority(StrEnum):
    """The priority classes, highest first."""

    CRITICAL = "critical"
    STANDARD = "standard"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        """0 for the highest class; the admission queue serves lower ranks first."""
        return RANK[self]

    @property
    def vllm(self) -> int:
        """vLLM's `priority` for this class (lower is scheduled earlier; vLLM's default is 0)."""
        return VLLM_PRIORITY[self]


RANK: dict[Priority, int] = {Priority.CRITICAL: 0, Priority.STANDARD: 1, Priority.BATCH: 2}
BY_RANK: tuple[Priority, ...] = (Priority.CRITICAL, Priority.STANDARD, Priority.BATCH)
VLLM_PRIORITY: dict[Priority, int] = {Priority.CRITICAL: -10, Priority.STANDARD: 0, Priority.BATCH: 10}
CHOICES: list[tuple[str, str]] = [(p.value, p.value) for p in Priority]
LOWEST = Priority.BATCH
DEFAULT = Priority.STANDARD
HEADER = b"x-priority"
"""The request header that names the class (lower-case, as ASGI gives header names)."""

_BY_NAME: dict[str | bytes, Priority] = {**{p.value: p for p in Priority}, **{p.value.encode(): p for p in Priority}}


def priority_parse(value: object) -> Priority:
    """The class a request asks for: a class name (str or header bytes, any case), or vLLM's integer priority.

    Raises ValueError for anything else (the caller answers 400 naming the parameter).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return Priority.CRITICAL if value < 0 else Priority.STANDARD if value == 0 else Priority.BATCH
    if isinstance(value, str | bytes):
        found = _BY_NAME.get(value) or _BY_NAME.get(value.strip().lower())
        if found is not None:
            return found
    raise ValueError("Must be one of critical, standard, batch (or an integer: below 0, 0, above 0).")


def priority_clamp(requested: Priority | None, *, default: Priority, ceiling: Priority) -> Priority:
    """The class a request runs in: what it asked for (else the key's default), never above the ceiling."""
    wanted = default if requested is None else requested
    return wanted if RANK[wanted] >= RANK[ceiling] else ceiling


@dataclass(frozen=True, slots=True)
class Flow:
    """Who a request is for the admission queue: its key (the fairness unit), its class and its key's weight."""

    key: str = "anonymous"
    priority: Priority = DEFAULT
    weight: int = 1


DEFAULT_FLOW = Flow()
MASTER_CEILING = Priority.CRITICAL
"""The master key may ask for any class; its default is DEFAULT."""


def priority_requested(data: dict[str, Any], headers: Sequence[tuple[bytes, bytes]]) -> Priority | None:
    """The class a request asks for (the `x-priority` header, else the body's `priority`), or None.

    The body's `priority` is removed either way: the dispatcher sends vLLM the class's own value, and only to pools
    running vLLM's priority scheduler. An unknown value is a 400 naming the header or the parameter.
    """
    body_value = data.pop("priority", None)
    for name, value in headers:
        if name == HEADER:
            try:
                return priority_parse(value)
            except ValueError as exc:
                raise APIError(400, f"The x-priority header is invalid. {exc}", code="invalid_priority") from None
    if body_value is None:
        return None
    try:
        return priority_parse(body_value)
    except ValueError as exc:
        raise APIError(400, f"Invalid 'priority'. {exc}", param="priority", code="invalid_priority") from None
