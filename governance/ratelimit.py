"""Per-key rate limits (requests and tokens per minute) and daily token budgets.

Fixed one-minute windows (aligned to the wall clock, UTC) and UTC-day budgets. With Redis, admission is one
Lua script that checks all three counters and increments them only when every limit holds, so several
platform processes together admit exactly the limit. TPM reserves the estimated prompt tokens plus
`max_tokens` at admission; `settle` corrects the counters to the real usage afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from core.aio import running_loop
from core.errors import APIError

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript
from governance.snapshot import KeySnap

logger = logging.getLogger(__name__)

WINDOW_S = 60
DAY_S = 86_400


class RedisFailureMode(StrEnum):
    """What admission does when Redis cannot be reached."""

    LOCAL = "local"  # fail open to this process's own counters (limits then hold per process)
    CLOSED = "closed"  # refuse limited keys with 503
    OPEN = "open"  # admit without limits


@dataclass(slots=True)
class Reservation:
    """An admitted request: what was counted, for the response headers and for settling."""

    key_id: str
    window: int
    day: int
    reserved_tokens: int
    rpm_limit: int | None
    tpm_limit: int | None
    requests_used: int
    tokens_used: int
    reset_s: float
    local: bool = False

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """OpenAI's x-ratelimit-* headers."""
        reset = f"{max(self.reset_s, 0.0):.0f}s".encode()
        out: list[tuple[bytes, bytes]] = []
        if self.rpm_limit:
            out += [
                (b"x-ratelimit-limit-requests", str(self.rpm_limit).encode()),
                (b"x-ratelimit-remaining-requests", str(max(self.rpm_limit - self.requests_used, 0)).encode()),
                (b"x-ratelimit-reset-requests", reset),
            ]
        if self.tpm_limit:
            out += [
                (b"x-ratelimit-limit-tokens", str(self.tpm_limit).encode()),
                (b"x-ratelimit-remaining-tokens", str(max(self.tpm_limit - self.tokens_used, 0)).encode()),
                (b"x-ratelimit-reset-tokens", reset),
            ]
        return tuple(out)


def rate_limited(key: KeySnap, which: str, reset_s: float, headers: tuple[tuple[bytes, bytes], ...]) -> APIError:
    """429 in OpenAI's shape with Retry-After and the rate-limit headers."""
    messages = {
        "rpm": f"Rate limit reached for key `{key.name}`: {key.rpm_limit} requests per minute.",
        "tpm": f"Rate limit reached for key `{key.name}`: {key.tpm_limit} tokens per minute.",
        "day": f"Daily token budget of key `{key.name}` ({key.daily_token_budget} tokens) is used up.",
    }
    retry = max(1, int(reset_s + 0.999))
    return APIError(
        429,
        messages[which] + f" Retry in {retry} s.",
        type="rate_limit_error" if which != "day" else "insufficient_quota",
        code="rate_limit_exceeded" if which != "day" else "daily_budget_exceeded",
        headers=((b"retry-after", str(retry).encode()), *headers),
    )


def _clock_window(now: float) -> tuple[int, int, float, float]:
    window = int(now // WINDOW_S)
    day = int(now // DAY_S)
    return window, day, (window + 1) * WINDOW_S - now, (day + 1) * DAY_S - now


class RateLimiter(Protocol):
    """Admission and settlement of limited keys."""

    async def admit(self, key: KeySnap, tokens: int) -> Reservation:
        """Count the request and reserve tokens, or raise a 429 APIError."""
        ...

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Correct the reserved tokens to the real usage."""
        ...


class LocalRateLimiter:
    """Counters in this process (development without Redis, or the fail-open fallback)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._minute: dict[tuple[str, int], list[int]] = {}  # (key bucket, window) -> [requests, tokens]
        self._day: dict[tuple[str, int], int] = {}

    async def admit(self, key: KeySnap, tokens: int) -> Reservation:
        """Check and count under the event loop (no await between check and increment: atomic here)."""
        now = self._clock()
        window, day, reset_s, day_reset_s = _clock_window(now)
        self._prune(window, day)
        counters = self._minute.setdefault((key.bucket, window), [0, 0])
        spent_today = self._day.get((key.bucket, day), 0)
        which = None
        if key.rpm_limit and counters[0] + 1 > key.rpm_limit:
            which = "rpm"
        elif key.tpm_limit and counters[1] + tokens > key.tpm_limit:
            which = "tpm"
        elif key.daily_token_budget and spent_today + tokens > key.daily_token_budget:
            which = "day"
        reservation = Reservation(
            key.bucket, window, day, 0, key.rpm_limit, key.tpm_limit, counters[0], counters[1], reset_s, local=True
        )
        if which is not None:
            raise rate_limited(key, which, day_reset_s if which == "day" else reset_s, reservation.headers())
        counters[0] += 1
        counters[1] += tokens
        self._day[(key.bucket, day)] = spent_today + tokens
        reservation.reserved_tokens = tokens
        reservation.requests_used, reservation.tokens_used = counters[0], counters[1]
        return reservation

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Apply the difference between real and reserved tokens."""
        delta = actual_tokens - reservation.reserved_tokens
        counters = self._minute.get((reservation.key_id, reservation.window))
        if counters is not None:
            counters[1] = max(counters[1] + delta, 0)
        day_key = (reservation.key_id, reservation.day)
        if day_key in self._day:
            self._day[day_key] = max(self._day[day_key] + delta, 0)

    def _prune(self, window: int, day: int) -> None:
        if len(self._minute) > 10_000 or any(w < window for _, w in list(self._minute)[:1]):
            self._minute = {k: v for k, v in self._minute.items() if k[1] >= window}
        if len(self._day) > 10_000:
            self._day = {k: v for k, v in self._day.items() if k[1] >= day}


_ADMIT = """
local rpm_limit = tonumber(ARGV[1])
local tpm_limit = tonumber(ARGV[2])
local day_limit = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local req = tonumber(redis.call('GET', KEYS[1]) or '0')
local tok = tonumber(redis.call('GET', KEYS[2]) or '0')
local day = tonumber(redis.call('GET', KEYS[3]) or '0')
if rpm_limit > 0 and req + 1 > rpm_limit then return {0, 1, req, tok} end
if tpm_limit > 0 and tok + tokens > tpm_limit then return {0, 2, req, tok} end
if day_limit > 0 and day + tokens > day_limit then return {0, 3, req, tok} end
req = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
tok = redis.call('INCRBY', KEYS[2], tokens)
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('INCRBY', KEYS[3], tokens)
redis.call('EXPIRE', KEYS[3], ARGV[6])
return {1, 0, req, tok}
"""

_SETTLE = """
local delta = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], delta) end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], delta) end
return 1
"""

_WHICH = {1: "rpm", 2: "tpm", 3: "day"}


class RedisRateLimiter:
    """Counters in Redis shared by every platform process; one atomic script per admission."""

    def __init__(
        self,
        url: str,
        *,
        failure_mode: RedisFailureMode = RedisFailureMode.LOCAL,
        timeout_s: float = 0.25,
        prefix: str = "llm:rl:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.failure_mode = failure_mode
        self.timeout_s = timeout_s
        self.prefix = prefix
        self._clock = clock
        self.local = LocalRateLimiter(clock)
        self._client: object | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admit: AsyncScript | None = None
        self._settle: AsyncScript | None = None
        self._last_failure_log = 0.0

    def _redis(self) -> object:
        loop = running_loop()
        if self._client is None or self._loop is not loop:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )
            self._admit = client.register_script(_ADMIT)
            self._settle = client.register_script(_SETTLE)
            self._client, self._loop = client, loop
        return self._client

    def _scripts(self) -> tuple[AsyncScript, AsyncScript]:
        """The admission and settle scripts, registered on this event loop's client."""
        self._redis()
        if self._admit is None or self._settle is None:
            raise RuntimeError("rate limit scripts are not registered")
        return self._admit, self._settle

    def _keys(self, key_id: str, window: int, day: int) -> list[str]:
        p = self.prefix
        return [f"{p}{key_id}:m:{window}:r", f"{p}{key_id}:m:{window}:t", f"{p}{key_id}:d:{day}"]

    async def admit(self, key: KeySnap, tokens: int) -> Reservation:
        """Run the admission script; on a Redis failure follow the configured mode."""
        now = self._clock()
        window, day, reset_s, day_reset_s = _clock_window(now)
        try:
            admit, _ = self._scripts()
            allowed, which, requests_used, tokens_used = await admit(
                keys=self._keys(key.bucket, window, day),
                args=[
                    key.rpm_limit or 0,
                    key.tpm_limit or 0,
                    key.daily_token_budget or 0,
                    tokens,
                    int(reset_s) + 5,
                    int(day_reset_s) + 60,
                ],
            )
        except Exception as exc:  # connection refused, timeout, script errors
            return await self._on_failure(key, tokens, exc)
        reservation = Reservation(
            key.bucket,
            window,
            day,
            tokens if allowed else 0,
            key.rpm_limit,
            key.tpm_limit,
            int(requests_used),
            int(tokens_used),
            reset_s,
        )
        if not allowed:
            kind = _WHICH[int(which)]
            raise rate_limited(key, kind, day_reset_s if kind == "day" else reset_s, reservation.headers())
        return reservation

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Correct the minute's and the day's token counters by (real - reserved)."""
        if reservation.local:
            await self.local.settle(reservation, actual_tokens)
            return
        delta = actual_tokens - reservation.reserved_tokens
        if not delta:
            return
        keys = self._keys(reservation.key_id, reservation.window, reservation.day)
        try:
            _, settle = self._scripts()
            await settle(keys=[keys[1], keys[2]], args=[delta])
        except Exception as exc:
            self._log_failure(exc)

    async def _on_failure(self, key: KeySnap, tokens: int, exc: Exception) -> Reservation:
        self._log_failure(exc)
        if self.failure_mode is RedisFailureMode.LOCAL:
            return await self.local.admit(key, tokens)
        if self.failure_mode is RedisFailureMode.CLOSED:
            raise APIError(
                503,
                "The rate limiter is unavailable; limited keys are refused until it is back.",
                type="server_error",
                code="rate_limiter_unavailable",
                headers=((b"retry-after", b"5"),),
            )
        window, day, reset_s, _ = _clock_window(self._clock())
        return Reservation(key.bucket, window, day, 0, key.rpm_limit, key.tpm_limit, 0, 0, reset_s, local=True)

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_failure_log > 10:
            self._last_failure_log = now
            logger.warning("Redis rate limiter unavailable (%s); mode %s", exc, self.failure_mode.value)


def estimate_tokens_size(body_size: int, data: dict[str, object]) -> int:
    """Tokens to reserve at admission: the body's size / 4 (about 4 bytes a token) plus `max_tokens` (or the
    Responses API's `max_output_tokens`).

    It over-counts the JSON syntax on purpose; `settle` brings the counters back to the real usage.
    """
    max_tokens = data.get("max_completion_tokens") or data.get("max_tokens") or data.get("max_output_tokens")
    completion = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else 0
    return body_size // 4 + completion
