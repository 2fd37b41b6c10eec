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
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from rest_framework import serializers

from backends.snapshot import BackendSnap, ModelSnap, RegistrySnapshot
from core import telemetry
from core.aio import running_loop
from core.db import adb_connections_close, db_call
from core.ids import random_id
from governance.metrics import metrics_endpoint
from governance.priority import Priority, priority_requested
from governance.ratelimit import LocalRateLimiter, RateLimiter, RedisFailureMode, RedisRateLimiter
from governance.snapshot import KeySnapshot
from routing import errors
from routing.auth import MASTER, Principal, bearer_token, master_key_matches
from routing.dispatch import Dispatcher, RequestContext
from routing.errors import APIError
from routing.exchange import ClientGone, Lifecycle, stream_state
from routing.fastcheck import fast_valid_chat, fast_valid_completion, fast_valid_embedding
from routing.health import CircuitBreakers, MetricsScraper, RetryBudget
from routing.prefix import PrefixConfig, PrefixSync
from routing.registry import RegistryCache
from routing.responses import (
    RESPONSES_HOOKS,
    STORED_PATH,
    ResponsesRequestSerializer,
    fast_valid_responses,
    serve_stored,
)
from routing.runtime import PROCESS_ID, RuntimePublisher
from routing.serializers import (
    ChatCompletionRequestSerializer,
    CompletionRequestSerializer,
    DetokenizeRequestSerializer,
    EmbeddingRequestSerializer,
    RequestLimits,
    RerankRequestSerializer,
    ScoreRequestSerializer,
    TokenizeRequestSerializer,
    check_counts,
    check_depth,
    parse_json,
    validate_request_offloaded,
)
from routing.shadow import ShadowMirror, ShadowTicket
from routing.sse import StreamState
from routing.tracing import configure_capture
from routing.traffic import split_choose
from routing.usage import MemoryUsageSink, UsageSink

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
DISCONNECT_WATCH_AFTER_S = 0.5
"""A request still waiting for its backend after this long starts watching for its client's disconnect."""
T = TypeVar("T")


class EndpointHooks(Protocol):
    """What an endpoint does beyond the common path (the Responses API's: `routing.responses.ResponsesHooks`).

    An endpoint with hooks gets no `stream_options` added: its stream reports usage its own way.
    """

    def prepare(
        self, data: dict[str, Any], *, model: ModelSnap, registry: RegistrySnapshot, principal: Principal | None
    ) -> tuple[BackendSnap | None, Any]:
        """Rewrite the validated body for the backend; return the backend it must go to (or None) and a state."""

    def answer(self, result: dict[str, Any], lc: Lifecycle) -> None:
        """Rewrite a JSON answer for the client (after the model name)."""

    def stream_state(self, lc: Lifecycle) -> StreamState:
        """The SSE relay state of a stream."""

    def error(self, exc: APIError, lc: Lifecycle) -> APIError:
        """The error the client sees for this one."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A POST endpoint of the OpenAI API (or of vLLM's own) and the model kinds that may serve it.

    `tokens`: whether the endpoint consumes tokens: a token reservation at admission (TPM, daily budget) and usage
    expected from the backend. The tokenizer endpoints do not: they count as requests (RPM) with 0 tokens.
    """

    name: str
    upstream_path: str
    serializer: type[serializers.Serializer]
    kinds: frozenset[str]
    can_stream: bool
    fast_valid: Callable[[dict[str, Any]], bool]
    tokens: bool = True
    hooks: EndpointHooks | None = None


def _never_fast(data: dict[str, Any]) -> bool:
    """No fast path: the serializers validate every body (endpoints off the hot path)."""
    return False


ALL_KINDS = frozenset({"chat", "completion", "embedding", "rerank"})
POOLING_KINDS = frozenset({"embedding", "rerank"})  # vLLM scores with an embedding model as a bi-encoder
_RERANK = Endpoint("rerank", "/rerank", RerankRequestSerializer, POOLING_KINDS, False, _never_fast)
_SCORE = Endpoint("score", "/score", ScoreRequestSerializer, POOLING_KINDS, False, _never_fast)


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
    # vLLM's own APIs, at its paths (vLLM serves /v1/rerank, /rerank, /v2/rerank and /v1/score, /score alike):
    "/v1/rerank": _RERANK,
    "/rerank": _RERANK,
    "/v2/rerank": _RERANK,
    "/v1/score": _SCORE,
    "/score": _SCORE,
    "/tokenize": Endpoint("tokenize", "/tokenize", TokenizeRequestSerializer, ALL_KINDS, False, _never_fast, False),
    "/detokenize": Endpoint(
        "detokenize", "/detokenize", DetokenizeRequestSerializer, ALL_KINDS, False, _never_fast, False
    ),
    "/v1/responses": Endpoint(
        "responses",
        "/v1/responses",
        ResponsesRequestSerializer,
        frozenset({"chat"}),
        True,
        fast_valid_responses,
        hooks=RESPONSES_HOOKS,
    ),
}
ROOT_ENDPOINTS = frozenset(path for path in ENDPOINTS if not path.startswith("/v1/"))
"""The endpoints outside /v1 (vLLM's): served here, not by Django."""


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
    strip_continuous_usage: bool = False
    priority: Priority | None = None  # the class the request asked for (header or body), before the key's ceiling
    split_from: str = ""  # the model the client asked for, when its traffic split chose `model` (routing.traffic)
    shadow: ShadowTicket | None = None  # set when the request is mirrored (routing.shadow)
    method: str = "POST"
    path: str = ""
    """The upstream path when not the endpoint's (a stored response's)."""
    hook_state: Any = None
    """The endpoint hooks' state for this request."""


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
        continuous_usage: bool = True,
        expose_backend: bool = False,
        limits: RequestLimits | None = None,
        shadow: ShadowMirror | None = None,
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
        self.continuous_usage = continuous_usage
        self.expose_backend = expose_backend
        self.limits = limits if limits is not None else RequestLimits()
        self._models_body: tuple[int, bytes] = (-2, b"")
        self.shadow = shadow if shadow is not None else ShadowMirror()
        self.shadow.attach(dispatcher=dispatcher, lifecycle=self.lifecycle)

    @classmethod
    def from_settings(cls, fallback: ASGIApp | None) -> Gateway:
        """Build the gateway from Django settings, with the registry read from the database."""
        from django.conf import settings

        from backends.selectors import registry_snapshot_build, registry_version_get
        from governance.selectors import key_registry_version_get, key_snapshot_build
        from governance.usage import BatchUsageWriter

        configure_capture(settings.ROUTER_TRACE_CAPTURE_PROMPTS)
        precise = None
        if settings.ROUTER_KV_EVENTS:  # routing.precise (pyzmq, msgspec) is imported only when precise mode is on
            from routing.precise import precise_routing_from_settings

            precise = precise_routing_from_settings()
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
            queue_promote_after_s=settings.ROUTER_QUEUE_PROMOTE_AFTER_S,
            prefix=PrefixConfig(
                block_bytes=settings.ROUTER_PREFIX_BLOCK_BYTES,
                max_blocks=settings.ROUTER_PREFIX_MAX_BLOCKS,
                min_match=settings.ROUTER_PREFIX_MIN_MATCH,
                balance_abs=settings.ROUTER_PREFIX_BALANCE_ABS,
                balance_rel=settings.ROUTER_PREFIX_BALANCE_REL,
                recent_s=settings.ROUTER_KV_EVENTS_RECENT_MS / 1000.0,
            ),
            upstream_limits={
                "max_header_line_bytes": settings.ROUTER_UPSTREAM_MAX_HEADER_LINE_BYTES,
                "max_headers": settings.ROUTER_UPSTREAM_MAX_HEADERS,
                "max_head_bytes": settings.ROUTER_UPSTREAM_MAX_HEAD_BYTES,
                "max_body_bytes": settings.ROUTER_UPSTREAM_MAX_BODY_BYTES,
            },
            prefix_sync=(
                PrefixSync(settings.REDIS_URL, process_id=PROCESS_ID)
                if settings.REDIS_URL and settings.ROUTER_PREFIX_SYNC
                else None
            ),
            precise=precise,
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
            continuous_usage=settings.ROUTER_STREAM_CONTINUOUS_USAGE,
            expose_backend=settings.ROUTER_EXPOSE_BACKEND,
            limits=RequestLimits.from_settings(),
            shadow=ShadowMirror.from_settings(),
        )

    # --- ASGI entry -----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve /v1, /healthz and /readyz; hand anything else to the fallback app."""
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith("/v1/") or path == "/v1":
                if not path.startswith(("/v1/files", "/v1/batches")) or self.fallback is None:
                    await self._v1(scope, receive, send)
                    return
                # the Batch API (batches/) is served by Django, below
            elif path == "/healthz":
                await _send_json(send, 200, b'{"status":"ok"}')
                return
            elif path.rstrip("/") in ROOT_ENDPOINTS:  # vLLM's /rerank, /v2/rerank, /score, /tokenize, /detokenize
                await self._v1(scope, receive, send)
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
                await self.shadow.aclose()  # before the usage writer: mirrors in flight record their usage
                close = getattr(self.usage, "aclose", None)
                if close is not None:  # flush buffered usage records before exiting
                    await close()
                if self.publisher is not None:
                    await self.publisher.aclose()
                await self.registry.aclose()
                if self.keys is not None:
                    await self.keys.aclose()
                await adb_connections_close()  # the database thread's kept connection (core.db), after its last use
                await self.dispatcher.aclose()
                if telemetry.TRACING:  # the spans still buffered, before the process exits
                    await asyncio.to_thread(telemetry.force_flush)
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
        request_id = random_id()  # 128 random bits, without a system call per request (core.ids)
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        method: str = scope["method"]
        endpoint = ENDPOINTS.get(path)
        try:
            if endpoint is not None:
                if method != "POST":
                    raise _method_not_allowed(method, path, "POST")
                await self._completion(scope, receive, send, endpoint, request_id, started)
                return
            if path.startswith(STORED_PATH):
                await serve_stored(self, scope, receive, send, path, request_id, started)
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
        except ClientGone:
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

    def lifecycle(
        self,
        endpoint: Endpoint,
        request_id: str,
        started: float,
        principal: Principal | None = None,
        *,
        headers: Iterable[tuple[bytes, bytes]] | None = None,
        transport: str = "http",
    ) -> Lifecycle:
        """A new request lifecycle bound to this gateway's dispatcher, usage sink and rate limiter.

        `headers` are the client's (a W3C `traceparent` among them continues the client's trace) and `transport`
        names the request's span ("http", "websocket", "batch"); both matter only while tracing is on.
        """
        return Lifecycle(
            dispatcher=self.dispatcher,
            usage_sink=self.usage,
            limiter=self.limiter,
            endpoint=endpoint,
            request_id=request_id,
            started=started,
            principal=principal,
            headers=headers,
            transport=transport,
        )

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
        self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, request_id: str, started: float
    ) -> None:
        """A completion-style request: one lifecycle, whose `finish` records it whatever happens."""
        lc = self.lifecycle(endpoint, request_id, started, headers=scope["headers"])
        error: BaseException | None = None
        try:
            lc.principal = await self._authenticate(scope)
            prepared, body_size = await self._read_request(scope, receive, endpoint, lc.principal)
            await lc.admit(prepared, body_size)
            if prepared.stream:
                await self._stream(receive, send, lc)
            else:
                await _until_disconnect(self._forward(send, lc), receive)
        except APIError as exc:
            if endpoint.hooks is not None:
                exc = endpoint.hooks.error(exc, lc)
            error = exc
            if lc.reservation is not None:
                exc.headers = (*exc.headers, *lc.limit_headers)
            await _send_error(send, exc, request_id, internal=lc.internal)
        except BaseException as exc:
            error = exc
            raise
        finally:
            await lc.finish(error)

    async def _read_request(
        self, scope: Scope, receive: Receive, endpoint: Endpoint, principal: Principal | None = None
    ) -> tuple[PreparedRequest, int]:
        """Check the headers, read the body (bounded), parse and validate it: the request ready to route."""
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
            data = parse_json(raw)
        except orjson.JSONDecodeError:
            raise APIError(
                400, "We could not parse the JSON body of your request: it is not valid JSON.", code="invalid_json"
            ) from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_body")
        prepared = await self.prepare(endpoint, data, headers=scope["headers"], size=len(raw), principal=principal)
        return prepared, len(raw)

    async def prepare(
        self,
        endpoint: Endpoint,
        data: dict[str, Any],
        *,
        force_stream: bool = False,
        headers: Sequence[tuple[bytes, bytes]] = (),
        size: int | None = None,
        principal: Principal | None = None,
    ) -> PreparedRequest:
        """Validate a request body, resolve its model and rewrite the body for the backend (400/404/503 APIError).

        `size` is the body's length in bytes when known (it decides whether validation runs in a worker thread);
        `principal` is whose request it is (the Responses API binds stored response ids to it).
        """
        if force_stream and endpoint.can_stream:
            data["stream"] = True  # before validation: `stream_options` is valid only on a stream
        check_counts(data, self.limits)  # list lengths only: before anything walks a list
        if not endpoint.fast_valid(data):
            # Not the common shape (or invalid): the serializers decide, and name the bad parameter; off the event
            # loop for a large body.
            await validate_request_offloaded(endpoint.serializer, data, self.limits, size=size)
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
        pin = hook_state = None
        if endpoint.hooks is not None:  # (a stored conversation goes on where it is stored: no split, no shadow)
            pin, hook_state = endpoint.hooks.prepare(data, model=model, registry=registry, principal=principal)
        user = data.get("user")
        context = RequestContext(
            user=user if isinstance(user, str) else None, headers=headers, endpoint=endpoint.name, data=data, pin=pin
        )
        shadow = self.shadow.plan(registry, model) if endpoint.hooks is None else None
        split = registry.splits.get(model.name) if pin is None else None
        split_from = ""
        if split is not None:  # canary: the split chooses the model that serves (once, here; docs/routing.md)
            served, _ = split_choose(split, context)
            if served is not model:
                split_from, model = model.name, served
        data["model"] = model.served_name
        stream = endpoint.can_stream and data.get("stream") is True
        strip_usage = strip_continuous = False
        if stream and endpoint.hooks is None:
            # Ask for usage anyway, on every chunk (accounting, even when the client leaves early), and strip what
            # the client did not ask for, so it sees the stream it requested.
            options = data.get("stream_options") or {}
            strip_usage = options.get("include_usage") is not True
            strip_continuous = self.continuous_usage and options.get("continuous_usage_stats") is not True
            wanted = {"include_usage": True}
            if self.continuous_usage:
                wanted["continuous_usage_stats"] = True
            if any(options.get(k) is not True for k in wanted):
                data["stream_options"] = {**options, **wanted}
        priority = priority_requested(data, headers)
        try:
            body = orjson.dumps(data)
        except orjson.JSONEncodeError:  # nested deeper than orjson encodes: name the parameter, as validation does
            check_depth(data)
            raise errors.bad_request("The request body is nested too deeply to forward.", code="invalid_body") from None
        return PreparedRequest(
            endpoint,
            data,
            model,
            requested,
            registry,
            stream,
            strip_usage,
            context,
            body,
            strip_continuous,
            priority,
            split_from,
            shadow,
            hook_state=hook_state,
        )

    async def _forward(self, send: Send, lc: Lifecycle) -> None:
        """A non-streamed request: the backend's JSON answer, model name rewritten, usage taken."""
        prepared = lc.prepared
        assert prepared is not None
        response = await lc.open()
        backend = lc.backend
        assert backend is not None
        if response.status_code != 200:
            raise await lc.upstream_error()
        lc.verdict(True)
        try:
            result = orjson.loads(response.content)
            if not isinstance(result, dict):
                raise TypeError(type(result).__name__)
            if "model" in result or prepared.endpoint.tokens:  # vLLM's tokenizer answers name no model
                result["model"] = prepared.requested
            if prepared.endpoint.hooks is not None:
                prepared.endpoint.hooks.answer(result, lc)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise errors.backend_failed(backend.name, "answered 200 with a body that is not a JSON object") from exc
        lc.take_usage(result.get("usage"))
        await _send_json(send, 200, orjson.dumps(result), self._answer_headers(lc))

    def _answer_headers(self, lc: Lifecycle) -> tuple[tuple[bytes, bytes], ...]:
        """`x-request-id`, the backend's name (to the master key, or to all with ROUTER_EXPOSE_BACKEND), limits."""
        headers: tuple[tuple[bytes, bytes], ...] = ((b"x-request-id", lc.request_id.encode()),)
        if lc.backend is not None and (self.expose_backend or lc.internal):
            headers = (*headers, (b"x-router-backend", lc.backend.name.encode()))
            if lc.prepared is not None and lc.prepared.split_from:  # the model a traffic split chose
                headers = (*headers, (b"x-router-model", lc.prepared.model.name.encode()))
        if lc.prepared is not None and lc.prepared.priority is not None:  # asked for a class: the one it ran in
            headers = (*headers, (b"x-priority", lc.flow.priority.value.encode()))
        return (*headers, *lc.limit_headers)

    # --- streaming ------------------------------------------------------------------------------------------

    async def _stream(self, receive: Receive, send: Send, lc: Lifecycle) -> None:
        """A streamed request: SSE events relayed as they arrive, until the end or the client leaves."""
        prepared = lc.prepared
        assert prepared is not None
        response = await _until_disconnect(lc.open(), receive)
        if response.status_code != 200:
            raise await lc.upstream_error()  # nothing was sent yet: a JSON error, as without streaming
        hooks = prepared.endpoint.hooks
        state = stream_state(prepared) if hooks is None else hooks.stream_state(lc)
        loop = running_loop()
        pump = loop.create_task(self._pump(send, lc, state))
        watcher = loop.create_task(_wait_disconnect(receive))
        try:
            await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watcher):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            lc.stream_ended(state)
        if pump.cancelled() or isinstance(pump.exception(), OSError):
            raise ClientGone
        if pump.exception() is not None:
            raise pump.exception()  # type: ignore[misc]

    async def _pump(self, send: Send, lc: Lifecycle, state: StreamState) -> None:
        """Copy upstream SSE events to the client as they arrive; errors after the first byte become SSE events."""
        response = lc.response
        assert response is not None
        await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *self._answer_headers(lc)]})
        upstream = response.aiter_raw()
        try:
            # Until the first bytes, a keep-alive comment every few seconds keeps proxies from timing out.
            first = running_loop().create_task(lc.next_chunk(upstream))
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
            lc.first_token()
            idle = self.stream_idle_timeout_s
            while True:
                out = state.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                chunk = await lc.next_chunk(upstream, idle)
        except StopAsyncIteration:
            await send({"type": "http.response.body", "body": state.flush(), "more_body": False})
            lc.verdict(True)
        except APIError as exc:
            lc.stream_failed(exc)
            event = b"event: error\ndata: " + exc.body(lc.internal) + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": False})


# --- helpers ----------------------------------------------------------------------------------------------------


def _model_entry(model: ModelSnap, public_name: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": public_name, "object": "model", "created": model.created, "owned_by": "llm-platform"}
    if model.max_context_length:
        entry["max_model_len"] = model.max_context_length
    return entry


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
            raise ClientGone
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


async def _send_error(send: Send, exc: APIError, request_id: str | None = None, *, internal: bool = False) -> None:
    headers = exc.headers
    if request_id:
        headers = (*headers, (b"x-request-id", request_id.encode()))
    await _send_json(send, exc.status, exc.body(internal), headers)


async def _until_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """Await `work`; if it takes longer than a moment, watch the client meanwhile, and cancel the work (closing
    its upstream request, so the backend stops) when the client disconnects: ClientGone is raised then.

    The watcher starts only after DISCONNECT_WATCH_AFTER_S, so fast requests pay for a timer, not a task.
    """
    loop = running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    gone = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        await _wait_disconnect(receive)
        gone = True
        task.cancel()

    def start() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(DISCONNECT_WATCH_AFTER_S, start)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientGone from None
        raise
    finally:
        timer.cancel()
        if watcher is not None and not watcher.done():
            watcher.cancel()


async def _database_reachable() -> bool:
    """Whether the database answers: in a pool thread, not the database thread (core.db.run_db), so that /readyz
    answers even while a write to an unreachable database holds that thread."""
    from django.db import connection

    def check() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            return cursor.fetchone() == (1,)

    return await asyncio.to_thread(db_call(check))
