"""WebSocket endpoint `/v1/ws`: streamed completions, several per connection, each cancellable by a message.

Protocol (see `docs/websocket.md`): authenticate with `Authorization: Bearer <key>` on the handshake or with a
first `{"type": "auth", "api_key": ...}` message; send `{"type": "request", "id", "endpoint", "body"}`; receive
`chunk` messages carrying the same chunk objects as the SSE stream, then one `done`, `error` or `cancelled` per
request; `{"type": "cancel", "id"}` stops a running request and closes its upstream response.

The consumer reuses the gateway's pieces (registry, dispatcher, usage sink, master key, serializers, SSE framing),
so a request costs the same as on the HTTP path: no Django view, no middleware and no database query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeGuard

import orjson
from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.routing import URLRouter
from django.urls import path, re_path

from core.ids import random_id
from routing import errors
from routing.auth import Principal, bearer_token
from routing.errors import APIError
from routing.exchange import Lifecycle, stream_state
from routing.gateway import ENDPOINTS, Endpoint, Gateway, Receive, Scope, Send
from routing.serializers import parse_json
from routing.sse import sse_data

if TYPE_CHECKING:
    from asgiref.typing import WebSocketDisconnectEvent

logger = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED = 4401
"""Close code after a missing or invalid key (4000-4999 are free for applications; 4401 mirrors HTTP 401)."""
CLOSE_TOO_BIG = 1009
"""Close code for a frame over the pre-authentication limit (RFC 6455: message too big)."""
# Endpoints with hooks (the Responses API: ids bound to the key, pinned follow-ups) are served over HTTP only.
WS_ENDPOINTS: dict[str, Endpoint] = {e.name: e for e in ENDPOINTS.values() if e.can_stream and e.hooks is None}
"""Endpoints a `request` message may name: the streaming ones, by their public name."""
MAX_ID_LENGTH = 200
NOT_AUTHENTICATED = 'Not authenticated: send {"type": "auth", "api_key": "<key>"} first.'

RequestId = str | int


class PendingSockets:
    """How many sockets of one application (one per process) are accepted but not yet authenticated, and the cap."""

    __slots__ = ("count", "limit", "logged_at")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.logged_at = -1e9


# --- the consumer -------------------------------------------------------------------------------------------------


class ChatSocketConsumer(AsyncJsonWebsocketConsumer):
    """One WebSocket connection: authenticate, then run streamed completion requests concurrently."""

    # Not a configured layer, so `get_channel_layer()` gives None: no per-connection channel (nor Redis polling).
    channel_layer_alias = "routing.ws:no-layer"

    def __init__(
        self,
        *,
        gateway: Gateway,
        pending: PendingSockets,
        auth_timeout_s: float = 5.0,
        preauth_max_bytes: int = 8192,
        max_requests: int = 32,
    ) -> None:
        super().__init__()
        self.gateway = gateway
        self.pending = pending
        self.auth_timeout_s = auth_timeout_s
        self.preauth_max_bytes = preauth_max_bytes
        self.max_requests = max_requests
        self.principal: Principal | None = None
        self.running: dict[RequestId, asyncio.Task[None]] = {}
        self.closing = False
        self._auth_timer: asyncio.Task[None] | None = None
        self._counted_pending = False

    # --- Channels hooks -----------------------------------------------------------------------------------------

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Call the message's handler; unlike Channels' default, no `close_old_connections` thread hop (no ORM)."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        """Accept; authenticate from the header now, else wait (bounded) for an `auth` message.

        A socket without a key in its handshake is pending until its `auth` message: at most `pending.limit` such
        sockets at once, beyond which the handshake is refused (503 where the server can answer HTTP, else 403).
        """
        authorization = _header(self.scope, b"authorization")
        if authorization is not None:
            await self.accept()
            try:
                self.principal = await self.gateway.authenticate(bearer_token(authorization))
            except APIError as exc:
                await self._reject(exc)
            return
        if self.pending.count >= self.pending.limit:
            await self._refuse_busy()
            return
        self.pending.count += 1
        self._counted_pending = True
        await self.accept()
        if self.auth_timeout_s > 0:
            self._auth_timer = asyncio.create_task(self._auth_deadline())

    async def websocket_disconnect(self, message: WebSocketDisconnectEvent) -> None:
        """As Channels' own, without its thread hop to close database connections: this consumer never uses the
        ORM (no groups either: it has no channel layer)."""
        await self.disconnect(message.get("code", 1000))
        raise StopConsumer

    async def disconnect(self, code: int) -> None:
        """Cancel every running request (closing their upstream responses) and the auth timer."""
        self.closing = True
        self._leave_pending()
        await self._cancel_all()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        """Decode one frame as a JSON object; answer malformed frames with an error instead of dropping the socket."""
        if self.closing:
            return
        if self.principal is None:
            size = len(text_data) if text_data is not None else len(bytes_data or b"")
            if size > self.preauth_max_bytes:
                await self._close_too_big(size)
                return
        if text_data is None:
            await self._send_error(
                None, errors.bad_request("Binary frames are not supported: send JSON text.", code="unsupported_frame")
            )
            return
        if len(text_data) > self.gateway.max_body_bytes:
            await self._send_error(
                None,
                APIError(
                    413,
                    f"The message is larger than the limit of {self.gateway.max_body_bytes} bytes.",
                    code="request_too_large",
                ),
            )
            return
        try:
            content = parse_json(text_data)
        except orjson.JSONDecodeError:
            await self._send_error(None, errors.bad_request("The message is not valid JSON.", code="invalid_json"))
            return
        if not isinstance(content, dict):
            await self._send_error(
                None, errors.bad_request("Each message must be a JSON object with a `type`.", code="invalid_message")
            )
            return
        await self.receive_json(content)

    async def receive_json(self, content: dict[str, Any], **kwargs: Any) -> None:
        """Handle one message by its `type`: auth, request or cancel."""
        kind = content.get("type")
        if kind == "auth":
            await self._auth(content)
        elif self.principal is None:
            rid = content.get("id") if kind == "request" else None
            await self._send_error(rid, errors.unauthorized(NOT_AUTHENTICATED))
        elif kind == "request":
            await self._start(content, self.principal)
        elif kind == "cancel":
            await self._cancel(content)
        else:
            await self._send_error(
                None,
                errors.bad_request(
                    f"Unknown message type {kind!r}: expected 'auth', 'request' or 'cancel'.",
                    param="type",
                    code="unknown_message_type",
                ),
            )

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        """Serialise an outgoing message with orjson."""
        return orjson.dumps(content).decode()

    # --- authentication ------------------------------------------------------------------------------------------

    async def _auth(self, content: dict[str, Any]) -> None:
        key = content.get("api_key")
        if not isinstance(key, str) or not key:
            await self._reject(errors.unauthorized("Missing API key: the auth message needs a string `api_key`."))
            return
        try:
            self.principal = await self.gateway.authenticate(key)
        except APIError as exc:
            await self._reject(exc)
            return
        self._leave_pending()
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        await self.send_json({"type": "authenticated"})

    async def _auth_deadline(self) -> None:
        await asyncio.sleep(self.auth_timeout_s)
        if self.principal is None and not self.closing:
            await self._reject(errors.unauthorized(f"No API key received within {self.auth_timeout_s:g} s."))

    async def _reject(self, exc: APIError) -> None:
        """Report the auth error, then close with 4401; later frames are ignored."""
        self.closing = True
        self.principal = None
        self._leave_pending()
        await self._cancel_all()  # a failed re-authentication ends what the previous key started
        await self._send_error(None, exc)
        await self.close(code=CLOSE_UNAUTHORIZED, reason=exc.message[:120])

    def _leave_pending(self) -> None:
        """Give back this socket's pending slot (authenticated, rejected or gone); once."""
        if self._counted_pending:
            self._counted_pending = False
            self.pending.count -= 1

    async def _refuse_busy(self) -> None:
        """Refuse the handshake: too many sockets are waiting to authenticate."""
        now = time.monotonic()
        if now - self.pending.logged_at >= 10:  # at most one line per 10 s, however many are refused
            self.pending.logged_at = now
            logger.warning("websocket handshakes refused: %d sockets already wait to authenticate", self.pending.count)
        extensions: dict[str, Any] = self.scope.get("extensions") or {}
        if "websocket.http.response" not in extensions:
            await self.close()  # the server answers the handshake with 403
            return
        error = APIError(
            503,
            "Too many WebSocket connections are waiting to authenticate; retry shortly.",
            type="server_error",
            code="too_many_pending_sockets",
        )
        body = error.body()
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
        ]
        # base_send: the consumer's own send() takes text or bytes for a frame
        start: dict[str, Any] = {"type": "websocket.http.response.start", "status": 503, "headers": headers}
        await self.base_send(start)  # type: ignore[arg-type]
        await self.base_send({"type": "websocket.http.response.body", "body": body})  # type: ignore[arg-type]

    async def _close_too_big(self, size: int) -> None:
        """Report a frame over the pre-authentication limit, then close with 1009; later frames are ignored."""
        self.closing = True
        self._leave_pending()
        await self._cancel_all()
        await self._send_error(
            None,
            APIError(
                413,
                f"A message before authentication may be at most {self.preauth_max_bytes} bytes; this one is {size}.",
                code="request_too_large",
            ),
        )
        await self.close(code=CLOSE_TOO_BIG)

    async def _cancel_all(self) -> None:
        """Cancel the running requests and the auth timer; wait for their cleanup (upstream closed, usage recorded)."""
        pending = list(self.running.values())
        self.running.clear()
        timer, self._auth_timer = self._auth_timer, None
        if timer is not None and timer is not asyncio.current_task():
            pending.append(timer)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # --- requests ------------------------------------------------------------------------------------------------

    async def _start(self, content: dict[str, Any], principal: Principal) -> None:
        rid = content.get("id")
        if not _valid_id(rid):
            await self._send_error(
                rid,
                errors.bad_request(
                    f"`id` must be a non-empty string (at most {MAX_ID_LENGTH} characters) or an integer.",
                    param="id",
                    code="invalid_id",
                ),
            )
            return
        if rid in self.running:
            # id null: this error must not read as the end of the running request that owns the id.
            await self._send_error(
                None,
                APIError(
                    409,
                    f"A request with id {rid!r} is already running on this connection.",
                    param="id",
                    code="duplicate_id",
                ),
            )
            return
        if len(self.running) >= self.max_requests:
            await self._send_error(
                rid,
                APIError(
                    429,
                    f"At most {self.max_requests} requests may run at once on one connection.",
                    code="too_many_requests",
                ),
            )
            return
        name = content.get("endpoint")
        endpoint = WS_ENDPOINTS.get(name) if isinstance(name, str) else None
        if endpoint is None:
            await self._send_error(
                rid,
                errors.bad_request(
                    f"`endpoint` must be one of {', '.join(repr(n) for n in WS_ENDPOINTS)}.",
                    param="endpoint",
                    code="invalid_endpoint",
                ),
            )
            return
        body = content.get("body")
        if not isinstance(body, dict):
            await self._send_error(
                rid,
                errors.bad_request(
                    "`body` must be a JSON object (the OpenAI request).", param="body", code="invalid_body"
                ),
            )
            return
        self.running[rid] = asyncio.create_task(self._run(rid, endpoint, body, principal))

    async def _cancel(self, content: dict[str, Any]) -> None:
        rid = content.get("id")
        if not _valid_id(rid):
            await self._send_error(
                None, errors.bad_request("`id` must be a request id.", param="id", code="invalid_id")
            )
            return
        task = self.running.pop(rid, None)
        if task is None:
            return  # already finished (its done/error was sent) or never started: nothing to cancel
        task.cancel()
        await asyncio.wait((task,))  # its cleanup closes the upstream response and records usage
        await self.send_json({"type": "cancelled", "id": rid})

    async def _run(self, rid: RequestId, endpoint: Endpoint, body: dict[str, Any], principal: Principal) -> None:
        """One request, as its own task: prepare, stream, and end with exactly one `done` or `error`."""
        lc = self.gateway.lifecycle(
            endpoint,
            random_id(),
            time.perf_counter(),
            principal,
            headers=self.scope["headers"],
            transport="websocket",
        )
        error: BaseException | None = None
        try:
            prepared = await self.gateway.prepare(endpoint, body, force_stream=True)
            await lc.admit(prepared, len(prepared.body))
            response = await lc.open()
            if response.status_code != 200:
                raise await lc.upstream_error()
            await self._pump(rid, lc)
            total = lc.prompt_tokens + lc.completion_tokens
            usage = {
                "prompt_tokens": lc.prompt_tokens,
                "completion_tokens": lc.completion_tokens,
                "total_tokens": total,
            }
            message = {"type": "done", "id": rid, "usage": usage, "request_id": lc.request_id}
        except APIError as exc:
            error = exc
            message = _error_message(rid, exc, lc.request_id, internal=lc.internal)
        except OSError as exc:
            error = exc  # sending failed: the client is gone (uvicorn raises ClientDisconnected)
            return
        except asyncio.CancelledError as exc:
            error = exc  # cancelled by the client or by the socket closing
            raise
        except Exception as exc:
            error = exc
            logger.exception("internal error on websocket request %s", lc.request_id)
            internal = APIError(
                500, f"Internal error (request {lc.request_id}).", type="server_error", code="internal_error"
            )
            message = _error_message(rid, internal, lc.request_id)
        finally:
            await lc.finish(error)
        with contextlib.suppress(OSError):
            await self._finish(rid, message)

    async def _finish(self, rid: RequestId, message: dict[str, Any]) -> None:
        """Unregister the running request, then send its final message (unless a cancel took it over)."""
        if self.running.get(rid) is not asyncio.current_task():
            return
        del self.running[rid]
        await self.send_json(message)

    async def _pump(self, rid: RequestId, lc: Lifecycle) -> None:
        """Relay upstream SSE events as `chunk` messages as they arrive (the gateway's idle timeout applies)."""
        assert lc.prepared is not None and lc.response is not None
        state = stream_state(lc.prepared)
        upstream = lc.response.aiter_raw()
        idle = self.gateway.stream_idle_timeout_s
        try:
            chunk = await lc.next_chunk(upstream)
            lc.first_token()
            while True:
                await self._relay(rid, state.feed(chunk), lc)
                chunk = await lc.next_chunk(upstream, idle)
        except StopAsyncIteration:
            await self._relay(rid, state.flush(), lc)
            lc.verdict(True)
        except APIError as exc:
            lc.stream_failed(exc)
            raise
        finally:
            lc.stream_ended(state)

    async def _relay(self, rid: RequestId, events: bytes, lc: Lifecycle) -> None:
        """Send each complete SSE event's JSON as a chunk; an upstream error event ends the request."""
        if not events:
            return
        for event in events.split(b"\n\n"):
            data = sse_data(event)
            if data is None or data == b"[DONE]":
                continue
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                assert lc.backend is not None
                raise errors.backend_failed(lc.backend.name, "sent a stream event that is not JSON") from None
            if isinstance(payload, dict) and isinstance(payload.get("error"), dict) and "choices" not in payload:
                raise _api_error(payload["error"], 502)
            await self.send_json({"type": "chunk", "id": rid, "data": payload})

    async def _send_error(self, rid: Any, exc: APIError) -> None:
        await self.send_json(_error_message(rid, exc, internal=self.principal is not None and self.principal.is_master))


# --- routing ------------------------------------------------------------------------------------------------------


def websocket_application(gateway: Gateway, *, max_pending: int | None = None, **options: Any) -> URLRouter:
    """The Channels app for ProtocolTypeRouter's "websocket" key: `/v1/ws`; other paths are refused.

    Pre-authentication bounds not given come from settings (`ROUTER_WS_*`); the pending-socket count is shared by
    the application's connections, so one application per process bounds the process.
    """
    from django.conf import settings

    options.setdefault("auth_timeout_s", settings.ROUTER_WS_AUTH_TIMEOUT_S)
    options.setdefault("preauth_max_bytes", settings.ROUTER_WS_PREAUTH_MAX_BYTES)
    pending = PendingSockets(max_pending if max_pending is not None else settings.ROUTER_WS_MAX_PENDING)
    return URLRouter(
        [
            # Django's stubs know views, not ASGI apps, in URL patterns
            path("v1/ws", ChatSocketConsumer.as_asgi(gateway=gateway, pending=pending, **options)),  # type: ignore[arg-type, list-item]
            re_path(r"", _refuse_unknown_path),  # type: ignore[arg-type, list-item]
        ]
    )


async def _refuse_unknown_path(scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse the handshake of a WebSocket to an unknown path (the client sees HTTP 403)."""
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 4404})
        elif message["type"] == "websocket.disconnect":
            return


# --- helpers ------------------------------------------------------------------------------------------------------


def _header(scope: Mapping[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def _valid_id(value: Any) -> TypeGuard[str | int]:
    if isinstance(value, str):
        return 0 < len(value) <= MAX_ID_LENGTH
    return isinstance(value, int) and not isinstance(value, bool)


def _error_message(rid: Any, exc: APIError, request_id: str | None = None, *, internal: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "error",
        "id": rid,
        "error": exc.payload(internal)["error"],
        "status": exc.status,
    }
    if request_id is not None:
        message["request_id"] = request_id
    return message


def _api_error(error: dict[str, Any], default_status: int) -> APIError:
    """An APIError from an upstream OpenAI/vLLM error object (vLLM puts the HTTP status in `code`)."""
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else default_status
    message = error.get("message")
    err_type = error.get("type")
    param = error.get("param")
    return APIError(
        status,
        message if isinstance(message, str) else f"HTTP {status}",
        type=err_type if isinstance(err_type, str) else "invalid_request_error",
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str | int) else None,
    )
