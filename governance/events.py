"""Usage events produced by every /v1 request, handed to a sink off the hot path."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """What one request cost and how it went."""

    request_id: str
    principal: str
    key_id: int | None
    endpoint: str
    model: str
    backend: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    stream: bool
    code: str | None = None  # the error code of a failed request (e.g. rate_limit_exceeded)
    trace_id: str | None = None  # the request's OpenTelemetry trace id (32 hex digits) when tracing is on
    queue_wait_ms: float | None = None  # time waited for a backend slot (None: never dispatched)
    attempts: int = 0  # backends tried (1 without retry; 0: never dispatched)
    failures: tuple[tuple[str, str], ...] = ()  # (backend, reason) of each failed attempt, in order


class UsageSink(Protocol):
    """Receives usage events; must not block (it runs on the event loop)."""

    def record(self, event: UsageEvent) -> None:
        """Take one event."""
        ...


class MemoryUsageSink:
    """Keeps the last events in memory (dev default, tests); the keys issue adds a batched database writer."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self.events: deque[UsageEvent] = deque(maxlen=maxlen)

    def record(self, event: UsageEvent) -> None:
        """Append the event (O(1), no I/O)."""
        self.events.append(event)
