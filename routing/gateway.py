"""The hot path: a raw ASGI application serving the OpenAI-compatible `/v1` API, `/healthz` and `/readyz`.

It sits in front of Django inside Channels' `ProtocolTypeRouter` (see `llm_platform/asgi.py`): `/v1` requests
never enter Django's request handling, so no sync view, no middleware stack and no database query runs per
request. Everything else (admin, the management API) is passed to Django's ASGI handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from rest_framework import serializers

from backends.snapshot import ModelSnap, RegistrySnapshot
from governance.metrics import metrics_endpoint
from governance.ratelimit import (
    LocalRateLimiter,
    RateLimiter,
    RedisFailureMode,
    RedisRateLimiter,
    Reservation,
    estimate_tokens_size,
)
from governance.snapshot import KeySnapshot
from routing import errors
from routing.auth import MASTER, Principal, bearer_token, master_key_matches
from routing.dispatch import Dispatcher, RequestContext, error_message_from
from routing.errors import APIError
from routing.fastcheck import fast_valid_chat, fast_valid_completion, fast_valid_embedding
from routing.health import CircuitBreakers, MetricsScraper, RetryBudget
from routing.registry import RegistryCache
from routing.runtime import RuntimePublisher
from routing.serializers import (
    ChatCompletionRequestSerializer,
    CompletionRequestSerializer,
    EmbeddingRequestSerializer,
    check_depth,
    validate_request,
)
from routing.upstream import UpstreamError, UpstreamReadTimeout, UpstreamResponse
from routing.usage import MemoryUsageSink, UsageEvent, UsageSink

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_HEADERS = ((b"content-type", b"application/json"),)
SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
KEEPALIVE_EVENT = b": keep-alive\n\n"
DONE_EVENT = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A POST endpoint of the OpenAI API and the model kinds that may serve it."""

    name: str
    upstream_path: str
    serializer: type[serializers.Serializer]
    kinds: frozenset[str]
    can_stream: bool
    fast_valid: Callable[[dict[str, Any]], bool]


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(
        "chat.completions",
        "/v1/chat/completions",
        ChatCompletionRequestSerializer,
        frozenset({"chat"}),
        True,
        fast_valid_chat,
    ),
    "/v1/completions": Endpoint(
        "completions",
        "/v1/completions",
        CompletionRequestSerializer,
        frozenset({"chat", "completion"}),
        True,
        fast_valid_completion,
    ),
    "/v1/embeddings": Endpoint(
        "embeddings",
        "/v1/embeddings",
        EmbeddingRequestSerializer,
        frozenset({"embedding"}),
        False,
        fast_valid_embedding,
    ),
}


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated request: the upstream body (model rewritten) and what serving it needs."""

    endpoint: Endpoint
    data: dict[str, Any]
    model: ModelSnap
    requested: str
    registry: RegistrySnapshot
    stream: bool
    strip_usage: bool
    context: RequestContext
    body: bytes


class _ClientGone(Exception):
    """The client disconnected."""


class Gateway:
    """ASGI app for `/v1/*`, `/healthz` and `/readyz`; other paths go to `fallback`."""

    def __init__(
        self,
        fallback: ASGIApp | None,
        *,
        registry: RegistryCache,
        dispatcher: Dispatcher,
        master_key: str,
        usage: UsageSink | None = None,
        max_body_bytes: int = 4 * 1024 * 1024,
        stream_keepalive_s: float = 5.0,
        stream_idle_timeout_s: float = 0.0,
        readiness_check: Callable[[], Awaitable[bool]] | None = None,
        publisher: RuntimePublisher | None = None,
        keys: RegistryCache | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.fallback = fallback
        self.registry = registry
        self.dispatcher = dispatcher
        self.master_key = master_key
        self.usage: UsageSink = usage if usage is not None else MemoryUsageSink()
        self.max_body_bytes = max_body_bytes
        self.stream_keepalive_s = stream_keepalive_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.readiness_check = readiness_check
        self.publisher = publisher
        self.keys = keys
        self.limiter = limiter
        self._models_body: tuple[int, bytes] = (-2, b"")

    @classmethod
    def from_settings(cls, fallback: ASGIApp | None) -> Gateway:
        """Build the gateway from Django settings, with the registry read from the database."""
        from django.conf import settings

        from backends.selectors import registry_snapshot_build, registry_version_get
        from governance.selectors import key_registry_version_get, key_snapshot_build
        from governance.usage import BatchUsageWriter

        dispatcher = Dispatcher(
            max_attempts=settings.ROUTER_MAX_ATTEMPTS,
            max_connections=settings.ROUTER_MAX_CONNECTIONS,
            max_keepalive=settings.ROUTER_MAX_KEEPALIVE,
            circuits=CircuitBreakers(
                threshold=settings.ROUTER_CIRCUIT_FAILURES, cooldown_s=settings.ROUTER_CIRCUIT_COOLDOWN_S
            ),
            retry_budget=RetryBudget(
                ratio=settings.ROUTER_RETRY_BUDGET_RATIO, min_retries=settings.ROUTER_RETRY_BUDGET_MIN
            ),
            scraper=MetricsScraper(interval_s=settings.ROUTER_METRICS_SCRAPE_S),
            queue_max=settings.ROUTER_QUEUE_MAX,
            queue_timeout_s=settings.ROUTER_QUEUE_TIMEOUT_S,
        )
        return cls(
            fallback,
            registry=RegistryCache(
                build=registry_snapshot_build,
                version=registry_version_get,
                poll_interval_s=settings.ROUTER_REGISTRY_POLL_S,
            ),
            dispatcher=dispatcher,
            master_key=settings.ROUTER_MASTER_KEY,
            usage=BatchUsageWriter.from_settings(dispatcher=dispatcher),
            max_body_bytes=settings.ROUTER_MAX_BODY_BYTES,
            stream_keepalive_s=settings.ROUTER_STREAM_KEEPALIVE_S,
            stream_idle_timeout_s=settings.ROUTER_STREAM_IDLE_TIMEOUT_S,
            readiness_check=_database_reachable,
            publisher=RuntimePublisher(dispatcher, redis_url=settings.REDIS_URL),
            keys=RegistryCache(
                build=key_snapshot_build,
                version=key_registry_version_get,
                poll_interval_s=settings.ROUTER_REGISTRY_POLL_S,
                name="keys",
                empty=KeySnapshot.empty(),
            ),
            limiter=(
                RedisRateLimiter(settings.REDIS_URL, failure_mode=RedisFailureMode(settings.RATE_LIMIT_ON_REDIS_ERROR))
                if settings.REDIS_URL
                else LocalRateLimiter()
            ),
        )

    # --- ASGI entry -----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve /v1, /healthz and /readyz; hand anything else to the fallback app."""
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith("/v1/") or path == "/v1":
                await self._v1(scope, receive, send)
                return
            if path == "/healthz":
                await _send_json(send, 200, b'{"status":"ok"}')
                return
            if path == "/readyz":
                await self._readyz(send)
                return
            if path == "/metrics":
                await metrics_endpoint(scope, send)
                return
        elif kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if self.fallback is None:
            await _send_error(send, APIError(404, f"Unknown path {scope.get('path')!r}.", code="unknown_url"))
            return
        await self.fallback(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                with contextlib.suppress(Exception):  # a database down at start is reported by /readyz
                    await self.registry.get()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                close = getattr(self.usage, "aclose", None)
                if close is not None:  # flush buffered usage records before exiting
                    await close()
                if self.publisher is not None:
                    await self.publisher.aclose()
                await self.registry.aclose()
                await self.dispatcher.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _readyz(self, send: Send) -> None:
        database_ok = True
        if self.readiness_check is not None:
            try:
                database_ok = await self.readiness_check()
            except Exception:
                database_ok = False
        with contextlib.suppress(Exception):
            await self.registry.get()
        # Ready means able to route: a loaded registry. The database is reported but does not gate readiness,
        # since routing goes on from the cached registry while it is down (a load balancer must keep sending).
        ready = self.registry.loaded
        body = orjson.dumps(
            {
                "status": "ready" if ready else "not ready",
                "database": "ok" if database_ok else "unreachable",
                "registry_loaded": self.registry.loaded,
                "registry_version": self.registry.snapshot.version,
            }
        )
        await _send_json(send, 200 if ready else 503, body)

    # --- /v1 ------------------------------------------------------------------------------------------------

    async def _v1(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        method: str = scope["method"]
        principal: Principal | None = None
        endpoint = ENDPOINTS.get(path)
        try:
            if endpoint is not None:
                if method != "POST":
                    raise _method_not_allowed(method, path, "POST")
                principal = await self._authenticate(scope)
                await self._completion(scope, receive, send, endpoint, principal, request_id, started)
                return
            if path == "/v1/models" or path.startswith("/v1/models/"):
                if method != "GET":
                    raise _method_not_allowed(method, path, "GET")
                principal = await self._authenticate(scope)
                await self._models(send, path[len("/v1/models/") :] if path != "/v1/models" else None, principal)
                return
            raise APIError(404, f"Unknown request URL: {method} {scope['path']}.", code="unknown_url")
        except APIError as exc:
            await _send_error(send, exc, request_id)
            if endpoint is not None and not exc.recorded:
                # Every request to a completion endpoint yields a usage record, errors included.
                self.usage.record(
                    UsageEvent(
                        request_id=request_id,
                        principal=principal.name if principal is not None else "anonymous",
                        key_id=principal.key.id if principal is not None and principal.key is not None else None,
                        endpoint=endpoint.name,
                        model=exc.model or "",
                        backend=exc.backend or "",
                        status=exc.status,
                        prompt_tokens=0,
                        completion_tokens=0,
                        latency_ms=(time.perf_counter() - started) * 1000.0,
                        ttft_ms=None,
                        stream=False,
                        code=str(exc.code) if exc.code is not None else None,
                    )
                )
        except _ClientGone:
            return
        except Exception:
            logger.exception("internal error on %s %s (request %s)", method, path, request_id)
            await _send_error(
                send,
                APIError(500, f"Internal error (request {request_id}).", type="server_error", code="internal_error"),
                request_id,
            )

    async def authenticate(self, token: str | None) -> Principal:
        """The principal of a bearer token (the master key or an enabled, unexpired client key); else 401."""
        if token is None:
            raise errors.unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        if master_key_matches(token, self.master_key):
            return MASTER
        if self.keys is not None:
            snapshot = await self.keys.get()
            key = snapshot.by_hash.get(hashlib.sha256(token.encode()).hexdigest())
            if key is not None:
                if key.expires_at is not None and key.expires_at <= time.time():
                    raise errors.unauthorized("This API key has expired.")
                return Principal(name=key.name, is_master=False, key=key)
        raise errors.unauthorized("Invalid API key.")

    async def _authenticate(self, scope: Scope) -> Principal:
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
                break
        return await self.authenticate(bearer_token(authorization))

    async def _models(self, send: Send, model_id: str | None, principal: Principal) -> None:
        registry = await self._registry()
        key = principal.key
        if model_id is not None:
            model = registry.models.get(model_id)
            if model is None or (key is not None and not key.may_use(model_id, model.name)):
                raise errors.model_not_found(model_id)
            await _send_json(send, 200, orjson.dumps(_model_entry(model, model_id)))
            return
        if key is not None and key.allowed_models is not None:
            visible = [m for m in registry.listed_models if key.may_use(m.name)]
            await _send_json(
                send, 200, orjson.dumps({"object": "list", "data": [_model_entry(m, m.name) for m in visible]})
            )
            return
        version, body = self._models_body
        if version != registry.version:
            body = orjson.dumps({"object": "list", "data": [_model_entry(m, m.name) for m in registry.listed_models]})
            self._models_body = (registry.version, body)
        await _send_json(send, 200, body)

    async def admit(self, principal: Principal, prepared: PreparedRequest, body_size: int) -> Reservation | None:
        """Apply the key's model access (404 as if the model did not exist) and its rate limits (429)."""
        key = principal.key
        if key is None:
            return None
        if not key.may_use(prepared.requested, prepared.model.name):
            raise errors.model_not_found(prepared.requested)
        if not key.limited or self.limiter is None:
            return None
        return await self.limiter.admit(key, estimate_tokens_size(body_size, prepared.data))

    async def settle(self, reservation: Reservation | None, tokens: int) -> None:
        """Bring the key's token counters to the real usage."""
        if reservation is not None and self.limiter is not None:
            await self.limiter.settle(reservation, tokens)

    async def _registry(self) -> RegistrySnapshot:
        registry = await self.registry.get()
        if self.publisher is not None:
            self.publisher.ensure_running()
        if not self.registry.loaded:
            raise APIError(
                503,
                "The model registry is not loaded yet; retry shortly.",
                type="server_error",
                code="registry_unavailable",
                headers=((b"retry-after", b"1"),),
            )
        return registry

    async def _completion(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        endpoint: Endpoint,
        principal: Principal,
        request_id: str,
        started: float,
    ) -> None:
        content_type = b""
        content_length = -1
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                with contextlib.suppress(ValueError):
                    content_length = int(value)
        if content_type.split(b";", 1)[0].strip().lower() != b"application/json":
            raise APIError(415, "Content-Type must be application/json.", code="unsupported_media_type")
        if content_length > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        raw = await _read_body(receive, self.max_body_bytes)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise APIError(
                400, "We could not parse the JSON body of your request: it is not valid JSON.", code="invalid_json"
            ) from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_body")
        prepared = await self.prepare(endpoint, data, headers=scope["headers"])
        try:
            reservation = await self.admit(principal, prepared, len(raw))
        except APIError as exc:
            exc.model = prepared.requested
            raise
        limit_headers = reservation.headers() if reservation is not None else ()
        tokens = 0
        try:
            if not prepared.stream:
                tokens = await self._forward(send, prepared, principal, request_id, started, limit_headers)
            else:
                tokens = await self._stream(receive, send, prepared, principal, request_id, started, limit_headers)
        except APIError as exc:
            exc.headers = (*exc.headers, *limit_headers)
            exc.model = exc.model or prepared.requested
            raise
        finally:
            await self.settle(reservation, tokens)

    async def prepare(
        self,
        endpoint: Endpoint,
        data: dict[str, Any],
        *,
        force_stream: bool = False,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> PreparedRequest:
        """Validate a request body, resolve its model and rewrite the body for the backend (400/404/503 APIError)."""
        if force_stream and endpoint.can_stream:
            data["stream"] = True  # before validation: `stream_options` is valid only on a stream
        if not endpoint.fast_valid(data):
            # Not the common shape (or invalid): the serializers decide, and name the bad parameter.
            validate_request(endpoint.serializer, data)
        requested: str = data["model"]
        registry = await self._registry()
        model = registry.models.get(requested)
        if model is None:
            raise errors.model_not_found(requested)
        if model.kind not in endpoint.kinds:
            raise errors.bad_request(
                f"The model `{requested}` is a {model.kind} model and does not support {endpoint.upstream_path}.",
                param="model",
                code="model_not_supported",
            )
        data["model"] = model.served_name
        stream = endpoint.can_stream and data.get("stream") is True
        strip_usage = False
        if stream:
            options = data.get("stream_options") or {}
            if options.get("include_usage") is not True:
                # Ask for usage anyway (accounting) and strip that chunk, so the client sees what it asked for.
                data["stream_options"] = {**options, "include_usage": True}
                strip_usage = True
        user = data.get("user")
        context = RequestContext(user=user if isinstance(user, str) else None, headers=headers)
        try:
            body = orjson.dumps(data)
        except orjson.JSONEncodeError:  # nested deeper than orjson encodes: name the parameter, as validation does
            check_depth(data)
            raise errors.bad_request("The request body is nested too deeply to forward.", code="invalid_body") from None
        return PreparedRequest(endpoint, data, model, requested, registry, stream, strip_usage, context, body)

    async def _forward(
        self,
        send: Send,
        prepared: PreparedRequest,
        principal: Principal,
        request_id: str,
        started: float,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> int:
        """Forward a non-streaming request; return the tokens it used."""
        requested = prepared.requested
        response, backend = await self.dispatcher.send(
            path=prepared.endpoint.upstream_path,
            body=prepared.body,
            model=prepared.model,
            registry=prepared.registry,
            request_id=request_id,
            stream=False,
            context=prepared.context,
        )
        status = response.status_code
        self.dispatcher.done(backend, status < 500, f"HTTP {status}")
        raw = response.content
        prompt_tokens = completion_tokens = 0
        if status == 200:
            try:
                result = orjson.loads(raw)
                result["model"] = requested
            except (orjson.JSONDecodeError, TypeError) as exc:
                raise errors.backend_failed(backend.name, "answered 200 with a body that is not a JSON object") from exc
            usage = result.get("usage")
            if isinstance(usage, dict):
                prompt_tokens = usage.get("prompt_tokens") or 0
                completion_tokens = usage.get("completion_tokens") or 0
            body = orjson.dumps(result)
        elif 400 <= status < 500:
            body = _passthrough_error(raw, status)
        else:
            raise errors.backend_failed(backend.name, f"HTTP {status}: {error_message_from(raw, status)}")
        await _send_json(
            send,
            status,
            body,
            ((b"x-request-id", request_id.encode()), (b"x-router-backend", backend.name.encode()), *extra_headers),
        )
        self.usage.record(
            UsageEvent(
                request_id=request_id,
                principal=principal.name,
                key_id=principal.key.id if principal.key is not None else None,
                endpoint=prepared.endpoint.name,
                model=requested,
                backend=backend.name,
                status=status,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                ttft_ms=None,
                stream=False,
            )
        )
        return prompt_tokens + completion_tokens

    # --- streaming ------------------------------------------------------------------------------------------

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        prepared: PreparedRequest,
        principal: Principal,
        request_id: str,
        started: float,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> int:
        """Stream a request to the client; return the tokens it used."""
        response, backend = await self.dispatcher.send(
            path=prepared.endpoint.upstream_path,
            body=prepared.body,
            model=prepared.model,
            registry=prepared.registry,
            request_id=request_id,
            stream=True,
            context=prepared.context,
        )
        if response.status_code != 200:
            # Nothing was sent to the client yet: answer with a JSON error, as for a non-streaming request.
            try:
                raw = await response.aread()
            except UpstreamError as exc:
                raise errors.backend_failed(backend.name, f"unreadable error body ({exc})") from None
            finally:
                await response.aclose()
                self.dispatcher.done(backend, response.status_code < 500, f"HTTP {response.status_code}")
            status = response.status_code
            if 400 <= status < 500:
                await _send_json(
                    send,
                    status,
                    _passthrough_error(raw, status),
                    ((b"x-request-id", request_id.encode()), *extra_headers),
                )
                return 0
            raise errors.backend_failed(backend.name, f"HTTP {status}: {error_message_from(raw, status)}")

        state = StreamState(
            served=prepared.model.served_name, requested=prepared.requested, strip_usage=prepared.strip_usage
        )
        pump = asyncio.ensure_future(
            self._pump(send, response, backend.name, request_id, state, started, extra_headers, backend.read_timeout_s)
        )
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watcher):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            await response.aclose()  # closing the upstream connection makes vLLM abort the generation
            finished = pump.done() and not pump.cancelled()
            if not finished:
                state.status = 499  # the client went away: no verdict on the backend
            self.dispatcher.done(
                backend, None if state.status == 499 else state.status < 500, f"stream ended with {state.status}"
            )
            self.usage.record(
                UsageEvent(
                    request_id=request_id,
                    principal=principal.name,
                    key_id=principal.key.id if principal.key is not None else None,
                    endpoint=prepared.endpoint.name,
                    model=prepared.requested,
                    backend=backend.name,
                    status=state.status,
                    prompt_tokens=state.prompt_tokens,
                    completion_tokens=state.completion_tokens,
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    ttft_ms=state.ttft_ms,
                    stream=True,
                )
            )
        return state.prompt_tokens + state.completion_tokens

    async def _pump(
        self,
        send: Send,
        response: UpstreamResponse,
        backend: str,
        request_id: str,
        state: StreamState,
        started: float,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
        read_timeout_s: float = 0.0,
    ) -> None:
        """Copy upstream SSE events to the client as they arrive, rewriting model names and picking usage."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    *SSE_HEADERS,
                    (b"x-request-id", request_id.encode()),
                    (b"x-router-backend", backend.encode()),
                    *extra_headers,
                ],
            }
        )
        upstream = response.aiter_raw()
        try:
            # Until the first bytes, a keep-alive comment every few seconds keeps proxies from timing out.
            first = asyncio.ensure_future(anext(upstream))
            try:
                while True:
                    done, _ = await asyncio.wait((first,), timeout=self.stream_keepalive_s)
                    if done:
                        break
                    await send({"type": "http.response.body", "body": KEEPALIVE_EVENT, "more_body": True})
                chunk = first.result()
            finally:
                if not first.done():
                    first.cancel()
            state.ttft_ms = (time.perf_counter() - started) * 1000.0
            await self._emit(send, state, chunk)
            idle = self.stream_idle_timeout_s
            while True:
                if idle > 0:
                    async with asyncio.timeout(idle):
                        chunk = await anext(upstream)
                else:
                    chunk = await anext(upstream)
                await self._emit(send, state, chunk)
        except StopAsyncIteration:
            if state.buffer:
                await send({"type": "http.response.body", "body": state.buffer, "more_body": True})
                state.buffer = b""
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, UpstreamReadTimeout) as exc:
            state.status = 504
            # TimeoutError: the router's idle timeout; ReadTimeout: the backend row's read timeout.
            limit = (
                self.stream_idle_timeout_s
                if isinstance(exc, TimeoutError) and not isinstance(exc, UpstreamReadTimeout)
                else read_timeout_s
            )
            await _send_sse_error(send, errors.backend_timeout(backend, limit, "send the next token"))
        except UpstreamError as exc:
            state.status = 502
            await _send_sse_error(send, errors.backend_failed(backend, f"stream broken ({type(exc).__name__})"))

    async def _emit(self, send: Send, state: StreamState, chunk: bytes) -> None:
        out = state.feed(chunk)
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})


class StreamState:
    """Frames SSE events out of raw chunks, rewrites the model name, extracts and optionally strips usage."""

    __slots__ = (
        "buffer",
        "completion_tokens",
        "prompt_tokens",
        "public_pattern",
        "served_pattern",
        "status",
        "strip_usage",
        "ttft_ms",
    )

    def __init__(self, *, served: str, requested: str, strip_usage: bool) -> None:
        self.served_pattern = b'"model":' + orjson.dumps(served)
        self.public_pattern = b'"model":' + orjson.dumps(requested)
        if self.served_pattern == self.public_pattern:
            self.served_pattern = b""
        self.strip_usage = strip_usage
        self.buffer = b""
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_ms: float | None = None
        self.status = 200

    def feed(self, chunk: bytes) -> bytes:
        """Take raw bytes; return the complete events ready for the client (possibly empty)."""
        buffer = self.buffer + chunk if self.buffer else chunk
        end = buffer.rfind(b"\n\n")
        if end < 0:
            if len(buffer) > 1 << 20:  # not SSE framing we understand: pass it through rather than hold it
                self.buffer = b""
                return buffer
            self.buffer = buffer
            return b""
        complete, self.buffer = buffer[: end + 2], buffer[end + 2 :]
        if self.served_pattern:
            complete = complete.replace(self.served_pattern, self.public_pattern)
        if b'"usage"' in complete:
            complete = self._usage(complete)
        return complete

    def _usage(self, events: bytes) -> bytes:
        kept: list[bytes] = []
        for event in events.split(b"\n\n"):
            if not event:
                continue
            if b'"usage"' in event and event.startswith(b"data: {"):
                try:
                    payload = orjson.loads(event[6:])
                except orjson.JSONDecodeError:
                    payload = None
                if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                    usage = payload["usage"]
                    self.prompt_tokens = usage.get("prompt_tokens") or self.prompt_tokens
                    self.completion_tokens = usage.get("completion_tokens") or self.completion_tokens
                    if self.strip_usage and not payload.get("choices"):
                        continue
            kept.append(event + b"\n\n")
        return b"".join(kept)


# --- helpers ----------------------------------------------------------------------------------------------------


def _model_entry(model: ModelSnap, public_name: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": public_name, "object": "model", "created": model.created, "owned_by": "llm-platform"}
    if model.max_context_length:
        entry["max_model_len"] = model.max_context_length
    return entry


def _passthrough_error(raw: bytes, status: int) -> bytes:
    """A backend's own 4xx body, passed through when it is already OpenAI-shaped, else wrapped."""
    try:
        data = orjson.loads(raw)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return raw
    except orjson.JSONDecodeError:
        pass
    return APIError(status, error_message_from(raw, status), code=status).body()


def _method_not_allowed(method: str, path: str, allowed: str) -> APIError:
    return APIError(
        405,
        f"Method {method} is not allowed on {path}; use {allowed}.",
        code="method_not_allowed",
        headers=((b"allow", allowed.encode()),),
    )


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {limit} bytes.", code="request_too_large")


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body = message.get("body", b"")
        if body:
            size += len(body)
            if size > limit:
                raise _too_large(limit)
            chunks.append(body)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _send_json(send: Send, status: int, body: bytes, extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *extra_headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, exc: APIError, request_id: str | None = None) -> None:
    headers = exc.headers
    if request_id:
        headers = (*headers, (b"x-request-id", request_id.encode()))
    await _send_json(send, exc.status, exc.body(), headers)


async def _send_sse_error(send: Send, exc: APIError) -> None:
    """After the first byte nothing can be retried: report the error as an SSE event and end the stream."""
    event = b"event: error\ndata: " + exc.body() + b"\n\n"
    await send({"type": "http.response.body", "body": event, "more_body": False})


async def _database_reachable() -> bool:
    from django.db import connection

    from routing.registry import _db_call

    def check() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            return cursor.fetchone() == (1,)

    return await asyncio.to_thread(_db_call(check))
