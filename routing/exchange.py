"""One request lifecycle: every step of a `/v1` request's upstream exchange, in one place.

A `Lifecycle` follows one request from admission to its usage record:

    admit (key access, rate-limit reservation) -> open (backend slot, send, retries/failover)
    -> read or stream (done by the transport, feeding what it sees into the lifecycle)
    -> finish: close the upstream response, give the backend its verdict (health, circuit breaker),
       record the usage event, settle the rate-limit reservation.

`finish` runs exactly once per request, whatever happened (success, an API error, a client that went away, a
cancelled task, a bug), so a transport cannot forget a step: the JSON path (`routing.gateway`), the SSE path
(`routing.gateway`) and the WebSocket path (`routing.ws`) only translate chunks into their own framing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from backends.snapshot import BackendSnap
from core import telemetry
from governance.priority import DEFAULT_FLOW, MASTER_CEILING, Flow, priority_clamp
from governance.ratelimit import RateLimiter, Reservation, estimate_tokens_size
from routing import errors
from routing.auth import MASTER, Principal
from routing.dispatch import Attempts, Dispatcher
from routing.errors import APIError
from routing.sse import StreamState
from routing.tracing import RequestTrace
from routing.upstream import UpstreamError, UpstreamReadTimeout, UpstreamResponse
from routing.usage import UsageEvent, UsageSink

if TYPE_CHECKING:
    from routing.gateway import Endpoint, PreparedRequest
    from routing.shadow import ShadowTicket

logger = logging.getLogger(__name__)

MASTER_FLOW = Flow(MASTER.name)
CLIENT_GONE = 499
"""Status recorded when the client went away (nginx's convention); it says nothing about the backend."""
MAX_TRUSTED_TOKENS = 100_000_000
"""A token count above this (or negative, or not an integer) from a backend is not trusted."""
UNTRUSTED_USAGE = "untrusted_usage"
MISSING_USAGE = "missing_usage"
"""Codes on the usage record of a 200 whose backend sent usage that cannot be trusted, or none at all."""


class ClientGone(Exception):
    """The client disconnected (HTTP) or the socket closed (WebSocket)."""


def trusted_tokens(value: object) -> int | None:
    """A backend's token count if it is believable: a non-negative integer below MAX_TRUSTED_TOKENS.

    Missing (None) counts as 0; anything else (a string, a float, a negative or absurd number) is None.
    """
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TRUSTED_TOKENS:
        return value
    return None


def stream_state(prepared: PreparedRequest) -> StreamState:
    """The SSE state of a prepared streamed request: what to rewrite and which usage to hide."""
    return StreamState(
        served=prepared.model.served_name,
        requested=prepared.requested,
        strip_final=prepared.strip_usage,
        strip_continuous=prepared.strip_continuous_usage,
    )


class Lifecycle:
    """The steps of one request's upstream exchange; see the module docstring."""

    __slots__ = (
        "_closed",
        "_finished",
        "_verdict_given",
        "attempts",
        "backend",
        "code",
        "completion_tokens",
        "dispatcher",
        "endpoint",
        "flow",
        "limiter",
        "max_attempts",
        "prepared",
        "principal",
        "prompt_tokens",
        "request_id",
        "reservation",
        "response",
        "started",
        "status",
        "stream",
        "streamed_events",
        "tap",
        "trace",
        "ttft_ms",
        "usage_seen",
        "usage_sink",
        "usage_untrusted",
    )

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        usage_sink: UsageSink,
        limiter: RateLimiter | None,
        endpoint: Endpoint,
        request_id: str,
        started: float,
        principal: Principal | None = None,
        headers: Iterable[tuple[bytes, bytes]] | None = None,
        transport: str = "http",
    ) -> None:
        self.dispatcher = dispatcher
        self.usage_sink = usage_sink
        self.limiter = limiter
        self.endpoint = endpoint
        self.request_id = request_id
        self.started = started
        self.principal = principal
        self.prepared: PreparedRequest | None = None
        self.flow: Flow = DEFAULT_FLOW
        self.reservation: Reservation | None = None
        self.backend: BackendSnap | None = None
        self.response: UpstreamResponse | None = None
        self.stream = False
        self.status = 200
        self.code: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage_seen = False
        self.usage_untrusted = False
        self.streamed_events = 0
        self.ttft_ms: float | None = None
        self.max_attempts: int | None = None  # None: the dispatcher's; 1 for shadow requests
        self.tap: ShadowTicket | None = None  # keeps a mirrored stream's bytes for its comparison
        self.attempts: Attempts | None = None  # set by open(): queue wait, backends tried, failed attempts
        self._verdict_given = False
        self._closed = False
        self._finished = False
        # The request's spans (routing.tracing), continuing the client's `traceparent` in `headers`; None while
        # tracing is off (core.telemetry.TRACING), and then no span object is made.
        self.trace = RequestTrace(endpoint, transport, headers) if telemetry.TRACING else None

    @property
    def trace_id(self) -> str | None:
        """The request's trace id (32 hex digits) when it is traced and sampled, else None."""
        return self.trace.trace_id if self.trace is not None else None

    # --- admission ----------------------------------------------------------------------------------------------

    async def admit(self, prepared: PreparedRequest, body_size: int) -> tuple[tuple[bytes, bytes], ...]:
        """The key's model access (404 as if the model did not exist), its priority class (the request's choice
        within the key's ceiling) and rate limits (429, with a reservation).

        Returns the `x-ratelimit-*` headers for the answer.
        """
        self.prepared = prepared
        self.stream = prepared.stream
        if prepared.stream and prepared.shadow is not None:
            self.tap = prepared.shadow
        principal = self.principal
        if self.trace is not None:
            self.trace.request(prepared, principal, self.request_id)
        key = principal.key if principal is not None else None
        if key is None:
            if principal is not None and principal.is_master:  # any class; the default when it names none
                priority = priority_clamp(prepared.priority, default=DEFAULT_FLOW.priority, ceiling=MASTER_CEILING)
                self.flow = MASTER_FLOW if priority is MASTER_FLOW.priority else Flow(principal.name, priority)
            return ()
        priority = priority_clamp(prepared.priority, default=key.priority_default, ceiling=key.priority_max)
        self.flow = Flow(key.bucket, priority, key.queue_weight)
        # Access is to the model asked for (a traffic split's choice needs no access of its own).
        if not key.may_use(prepared.requested, prepared.split_from or prepared.model.name):
            raise errors.model_not_found(prepared.requested)
        counts_tokens = self.endpoint.tokens
        if not counts_tokens:  # the tokenizer: counted as a request (RPM), exempt from token limits
            key = dataclasses.replace(key, tpm_limit=None, daily_token_budget=None)
        if not key.limited or self.limiter is None:
            return ()
        tokens = estimate_tokens_size(body_size, prepared.data) if counts_tokens else 0
        check = self.limiter.admit(key, tokens)
        self.reservation = await (check if self.trace is None else self.trace.admission(check))
        return self.reservation.headers()

    @property
    def limit_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The `x-ratelimit-*` headers of the reservation (none for unlimited keys and the master key)."""
        return self.reservation.headers() if self.reservation is not None else ()

    @property
    def internal(self) -> bool:
        """Whether internal names (backends, upstream errors) may be shown to this principal: the master key."""
        return self.principal is not None and self.principal.is_master

    # --- the upstream exchange ----------------------------------------------------------------------------------

    async def open(self) -> UpstreamResponse:
        """Take a backend slot and send the request (retrying or failing over before the first byte).

        For a non-streamed request the body has been read when this returns; for a stream it is unread.
        """
        prepared = self.prepared
        assert prepared is not None, "admit() comes first"
        trace = self.trace
        attempts = self.attempts = Attempts()
        try:
            response, backend = await self.dispatcher.send(
                path=prepared.path or prepared.endpoint.upstream_path,
                body=prepared.body,
                model=prepared.model,
                registry=prepared.registry,
                request_id=self.request_id,
                stream=prepared.stream,
                context=prepared.context,
                observer=trace,
                flow=self.flow,
                max_attempts=self.max_attempts,
                method=prepared.method,
                attempts=attempts,
            )
        except BaseException as exc:
            if trace is not None:
                trace.send_failed(exc)
            raise
        self.backend = backend
        self.response = response
        self.status = response.status_code
        if trace is not None:
            trace.answered(backend, response.status_code, prepared.stream)
        return response

    def verdict(self, ok: bool | None, reason: str = "") -> None:
        """Release the backend slot with an outcome for health and the circuit breaker (once; later calls no-op)."""
        if self._verdict_given or self.backend is None:
            return
        self._verdict_given = True
        self.dispatcher.done(self.backend, ok, reason)

    async def close(self) -> None:
        """Close the upstream response (for a stream this makes vLLM abort the generation); once."""
        if self._closed or self.response is None:
            return
        self._closed = True
        await self.response.aclose()

    async def upstream_error(self) -> APIError:
        """The error of a non-200 upstream answer: its body read (bounded by the client), the slot released."""
        response = self.response
        backend = self.backend
        assert response is not None and backend is not None
        status = response.status_code
        try:
            raw = await response.aread()
        except UpstreamError as exc:
            self.verdict(False, f"HTTP {status}, unreadable body")
            return errors.backend_failed(backend.name, "unreadable error body", detail=errors.describe(exc))
        finally:
            await self.close()
        self.verdict(status < 500, f"HTTP {status}")
        if 400 <= status < 500:
            return errors.passthrough(raw, status)
        return errors.backend_failed(backend.name, f"HTTP {status}: {errors.error_message_from(raw, status)}")

    async def next_chunk(self, upstream: AsyncIterator[bytes], idle_timeout_s: float = 0.0) -> bytes:
        """The next streamed chunk; a silence past the idle timeout (0: none) or the backend's read timeout is a
        504, a broken stream a 502 (both as APIError). Raises StopAsyncIteration at the end."""
        backend = self.backend
        assert backend is not None
        try:
            if idle_timeout_s > 0:
                async with asyncio.timeout(idle_timeout_s):
                    chunk = await anext(upstream)
            else:
                chunk = await anext(upstream)
        except UpstreamReadTimeout:
            raise errors.backend_timeout(backend.name, backend.read_timeout_s, "send the next token") from None
        except TimeoutError:
            raise errors.backend_timeout(backend.name, idle_timeout_s, "send the next token") from None
        except UpstreamError as exc:
            raise errors.backend_failed(backend.name, "stream broken", detail=errors.describe(exc)) from None
        if self.tap is not None:
            self.tap.feed(chunk)
        return chunk

    def stream_failed(self, error: APIError) -> None:
        """The stream broke after its first byte: record the status, blame the backend."""
        self.status = error.status
        self.code = str(error.code) if error.code is not None else None
        self.verdict(False, error.message)

    def stream_ended(self, state: StreamState) -> None:
        """The stream is over (whichever way): take its last usage and the count of events relayed."""
        self.take_usage(state.usage())
        self.streamed_events = state.events
        if self.trace is not None:
            self.trace.stream_ended(state.events)

    # --- what the transport saw ---------------------------------------------------------------------------------

    def take_usage(self, usage: Any) -> None:
        """Record the backend's usage object; counts that cannot be trusted are flagged, not taken."""
        if not isinstance(usage, dict):
            if usage is not None:
                self.usage_untrusted = True
            return
        prompt = trusted_tokens(usage.get("prompt_tokens", usage.get("input_tokens")))
        completion = trusted_tokens(usage.get("completion_tokens", usage.get("output_tokens")))
        if prompt is None or completion is None:
            self.usage_untrusted = True
            logger.warning(
                "backend %s sent usage that cannot be trusted (request %s)",
                self.backend.name if self.backend else "?",
                self.request_id,
            )
        self.prompt_tokens = prompt or 0
        self.completion_tokens = completion or 0
        self.usage_seen = True

    def first_token(self) -> None:
        """Note the time to the first streamed bytes."""
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000.0
            if self.trace is not None:
                self.trace.first_token(self.ttft_ms)

    def tokens_to_charge(self) -> int:
        """Tokens to settle the reservation with: the backend's trusted usage, else what was reserved.

        A stream whose client went away is charged the usage up to its last chunk (continuous usage stats);
        when no usage is known at all (or it cannot be trusted), the reservation is kept: never less than the
        events the client received.
        """
        known = self.prompt_tokens + self.completion_tokens
        if self.usage_seen and not self.usage_untrusted:
            return known
        reserved = self.reservation.reserved_tokens if self.reservation is not None else 0
        if self.backend is None:  # nothing reached a backend: nothing was consumed
            return 0
        return max(reserved, known, self.streamed_events)

    # --- the end ------------------------------------------------------------------------------------------------

    async def finish(self, error: BaseException | None = None) -> None:
        """Close, verdict, usage record, settle: every step once, whatever ended the request."""
        if self._finished:
            return
        self._finished = True
        self._status_from(error)
        try:
            await self.close()
        except Exception:  # closing a broken connection must not stop the accounting
            logger.debug("closing the upstream response failed (request %s)", self.request_id, exc_info=True)
        status = self.status
        prepared = self.prepared
        self.verdict(None if status == CLIENT_GONE else status < 500, f"ended with {status}")
        self._record()
        if self.reservation is not None and self.limiter is not None:
            try:
                await self.limiter.settle(self.reservation, self.tokens_to_charge())
            except Exception:
                logger.warning("settling the rate-limit reservation failed (request %s)", self.request_id)
        if self.trace is not None:
            self._end_trace(self.trace)
        if prepared is not None and prepared.shadow is not None:
            try:  # the answer is out: mirror it (queued, never awaited here)
                prepared.shadow.submit(self)
            except Exception:
                logger.exception("mirroring request %s failed", self.request_id)

    def _end_trace(self, trace: RequestTrace) -> None:
        prepared = self.prepared
        trusted = self.usage_seen and not self.usage_untrusted
        trace.finish(
            status=self.status,
            code=self.code,
            response_model=prepared.model.served_name if prepared is not None and self.backend is not None else None,
            input_tokens=self.prompt_tokens,
            output_tokens=self.completion_tokens,
            usage_seen=trusted,
            priority=str(self.flow.priority),
        )

    def _status_from(self, error: BaseException | None) -> None:
        if error is None:
            return
        if isinstance(error, APIError):
            self.status = error.status
            self.code = str(error.code) if error.code is not None else None
        elif isinstance(error, ClientGone | asyncio.CancelledError | OSError):
            self.status = CLIENT_GONE
        else:
            self.status = 500
            self.code = "internal_error"

    def _record(self) -> None:
        principal = self.principal
        prepared = self.prepared
        code = self.code
        if self.usage_untrusted and code is None:
            code = UNTRUSTED_USAGE
        elif (
            code is None
            and self.status == 200
            and self.backend is not None
            and not self.usage_seen
            and self.endpoint.tokens  # the tokenizer endpoints report no usage: recorded with 0 tokens
        ):
            code = MISSING_USAGE  # asked for usage, got none: charged the reservation
        attempts = self.attempts
        self.usage_sink.record(
            UsageEvent(
                request_id=self.request_id,
                principal=principal.name if principal is not None else "anonymous",
                key_id=principal.key.id if principal is not None and principal.key is not None else None,
                endpoint=self.endpoint.name,
                # the model that served: a traffic split's choice, else the name asked for
                model=(prepared.model.name if prepared.split_from else prepared.requested) if prepared else "",
                backend=self.backend.name if self.backend is not None else "",
                status=self.status,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                latency_ms=(time.perf_counter() - self.started) * 1000.0,
                ttft_ms=self.ttft_ms,
                stream=self.stream,
                code=code,
                trace_id=self.trace_id,
                queue_wait_ms=attempts.queue_wait_ms if attempts is not None else None,
                attempts=attempts.tried if attempts is not None else 0,
                failures=tuple(attempts.failures) if attempts is not None and attempts.failures else (),
            )
        )
