"""The OpenAI Responses API through the router: `POST /v1/responses` and the stored-response endpoints.

`POST /v1/responses` takes the common path (`routing.gateway`: validation, model, key access, token reservation,
the `Lifecycle`, JSON or SSE relay); the endpoint's hooks (`ResponsesHooks`) add what is particular to it:

- **Response ids that carry their backend.** vLLM keeps a stored response in the memory of the one server that
  generated it, so retrieval, cancel and a follow-up (`previous_response_id`) must reach that server. The router
  tells vLLM which id to use (`request_id`, a vLLM extension: `resp_` + 32 random hex digits) and hands the
  client another one: `resp_` + base64url(version, the backend's registry id, vLLM's id, the public model name,
  an HMAC tag). The tag (HMAC-SHA256 with a key derived from SECRET_KEY, truncated to 128 bits) covers the rest
  and the API key that created the response, so an id is only valid for that key (any other key, a forged or
  garbled id: 404) and no mapping is stored anywhere: any router process or replica, before or after a restart,
  decodes it the same way, with no database or Redis on the path. The backend is named by its registry id, never
  by its address or name. A backend that was removed or disabled answers 410 (`response_gone`), never another
  backend's 404. SECRET_KEY_FALLBACKS are accepted when decoding, so rotating SECRET_KEY keeps ids valid.
- **Model names both ways**, in JSON and in every SSE event (the shared byte-level rewrite of `routing.sse`), and
  the id rewrite in every SSE event (a byte replace of the one id the router chose, plus `previous_response_id`).
- **Usage** as the Responses API reports it (`input_tokens` / `output_tokens`): from the JSON body, or, streamed,
  from the `response.completed` event only (parsed once, at the end: the response object echoes the request's
  tools and schemas, so a byte search for `"usage":{` could find a client's own JSON there).

vLLM 0.32 serves `GET /v1/responses/{id}` (with `stream` / `starting_after` for background streams) and
`POST /v1/responses/{id}/cancel` (background responses only); those go through the same `Lifecycle`, pinned to
the response's backend, charged no tokens. It serves neither `DELETE /v1/responses/{id}` (405 here) nor
`GET /v1/responses/{id}/input_items` (404 here). See docs/routing.md, "The Responses API".
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson
from rest_framework import serializers

from backends.snapshot import BackendSnap, ModelSnap, RegistrySnapshot
from routing.auth import Principal
from routing.dispatch import RequestContext
from routing.errors import APIError, PassthroughError, bad_request
from routing.serializers import (
    JSONObjectField,
    StopField,
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
)
from routing.sse import StreamState

if TYPE_CHECKING:
    from routing.exchange import Lifecycle
    from routing.gateway import Gateway, Receive, Scope, Send

RESPONSE_ID_PREFIX = "resp_"
MAX_RESPONSE_ID_CHARS = 512
"""Longest response id accepted anywhere (the router's own are ~70 characters plus the model name)."""
STORED_PATH = "/v1/responses/"
_VERSION = 1
_TAG_BYTES = 16
_COMPACT_INNER = re.compile(r"resp_[0-9a-f]{32}\Z")
_SAFE_INNER = re.compile(r"[A-Za-z0-9_.:-]{1,200}\Z")
_PREVIOUS = re.compile(rb'"previous_response_id":"([A-Za-z0-9_.:-]{1,200})"')
_INPUT_ROLES = ("user", "assistant", "system", "developer")


# --- response ids ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRef:
    """What a public response id carries: where the response is stored, under which id, and for which model."""

    backend_id: int
    inner: str
    model: str


@functools.lru_cache(maxsize=4)
def _derive(secrets: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(b"llm-platform:response-id:v1\x00" + s.encode()).digest() for s in secrets)


def _keys() -> tuple[bytes, ...]:
    """The HMAC keys: SECRET_KEY's first (used to sign), then SECRET_KEY_FALLBACKS' (accepted when verifying)."""
    from django.conf import settings

    return _derive((settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ())))


def _binding(principal: Principal | None) -> bytes:
    """Whose response it is: the API key's registry id, or the master key."""
    if principal is None:
        return b""
    if principal.key is not None:
        return b"key:%d" % principal.key.id
    return b"master" if principal.is_master else b""


def _tag(key: bytes, binding: bytes, payload: bytes) -> bytes:
    return hmac.new(key, binding + b"\x00" + payload, hashlib.sha256).digest()[:_TAG_BYTES]


def encode_response_id(ref: StoredRef, principal: Principal | None) -> str | None:
    """The public id of a stored response for this principal (None if vLLM's id is not one the router can carry)."""
    binding = _binding(principal)
    if not binding:
        return None
    if _COMPACT_INNER.match(ref.inner):
        inner = b"\x00" + bytes.fromhex(ref.inner[len(RESPONSE_ID_PREFIX) :])
    elif _SAFE_INNER.match(ref.inner):
        raw = ref.inner.encode()
        inner = b"\x01" + bytes((len(raw),)) + raw
    else:
        return None
    model = ref.model.encode()
    if len(model) > 0xFFFF:
        return None
    payload = bytes((_VERSION,)) + ref.backend_id.to_bytes(8, "big") + inner + len(model).to_bytes(2, "big") + model
    token = payload + _tag(_keys()[0], binding, payload)
    return RESPONSE_ID_PREFIX + base64.urlsafe_b64encode(token).rstrip(b"=").decode()


def decode_response_id(public: object, principal: Principal | None) -> StoredRef | None:
    """The stored response a public id names, if the id is intact and this principal's; else None."""
    binding = _binding(principal)
    if not binding or not isinstance(public, str) or not public.startswith(RESPONSE_ID_PREFIX):
        return None
    if len(public) > MAX_RESPONSE_ID_CHARS:
        return None
    text = public[len(RESPONSE_ID_PREFIX) :]
    try:
        token = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None
    if len(token) < 1 + 8 + 1 + 2 + _TAG_BYTES or token[0] != _VERSION:
        return None
    payload, tag = token[:-_TAG_BYTES], token[-_TAG_BYTES:]
    if not any(hmac.compare_digest(tag, _tag(key, binding, payload)) for key in _keys()):
        return None
    try:
        backend_id = int.from_bytes(payload[1:9], "big")
        at = 9
        if payload[at] == 0:
            inner = RESPONSE_ID_PREFIX + payload[at + 1 : at + 17].hex()
            at += 17
        else:
            size = payload[at + 1]
            inner = payload[at + 2 : at + 2 + size].decode()
            at += 2 + size
        size = int.from_bytes(payload[at : at + 2], "big")
        model = payload[at + 2 : at + 2 + size].decode()
        if at + 2 + size != len(payload):
            return None
    except (IndexError, UnicodeDecodeError):
        return None
    return StoredRef(backend_id, inner, model)


# --- errors ---------------------------------------------------------------------------------------------------


def response_not_found(public: str) -> APIError:
    """404: no response with this id (unknown, forged, another key's, or forgotten by its backend)."""
    return APIError(404, f"Response with id '{public}' not found.", param="response_id", code="response_not_found")


def previous_not_found(public: str) -> APIError:
    """404 for a `previous_response_id` that names no response this key can continue."""
    return APIError(
        404,
        f"Previous response with id '{public}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def response_gone(public: str, why: str, *, param: str | None = "response_id") -> APIError:
    """410: the response was stored on a backend (or for a model) that is no longer there."""
    return APIError(410, f"Response with id '{public}' is gone: {why}.", param=param, code="response_gone")


# --- where a stored response lives ----------------------------------------------------------------------------


class _BackendsById:
    """The registry's backends by id, rebuilt when the registry snapshot changes (one dict build per version)."""

    registry: RegistrySnapshot | None = None
    backends: dict[int, BackendSnap] = {}

    @classmethod
    def get(cls, registry: RegistrySnapshot, backend_id: int) -> BackendSnap | None:
        if cls.registry is not registry:
            cls.backends = {b.id: b for pool in registry.pools.values() for b in pool.backends}
            cls.registry = registry
        return cls.backends.get(backend_id)


def stored_backend(
    registry: RegistrySnapshot, ref: StoredRef, public: str, *, param: str = "response_id"
) -> BackendSnap:
    """The backend holding a stored response, as the registry has it now; 410 if it was removed or disabled.

    A draining backend still answers for the responses it stores (it takes no new conversations, but the ones it
    holds can only go on there); an unhealthy one or one whose circuit is open gets the dispatcher's 503.
    """
    backend = _BackendsById.get(registry, ref.backend_id)
    if backend is None:
        raise response_gone(public, "the backend that stored it has been removed", param=param)
    pool = registry.pools.get(backend.pool)
    if backend.state == "disabled" or pool is None or not pool.enabled:
        raise response_gone(public, "the backend that stored it is disabled", param=param)
    return backend


# --- request validation ---------------------------------------------------------------------------------------


def _item_error(index: int, field: str, message: str) -> Any:
    """A list item's error, keyed by its index (the parameter is then named `input[<index>].<field>`)."""
    return {index: {field: message}}


class ResponseInputField(serializers.Field):
    """`input`: a string, or a list of input items (objects; message items are checked, others left to vLLM)."""

    default_error_messages = {"invalid": "Must be a string or a list of input items (objects)."}

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str):
            if "\x00" in data:
                self.fail("invalid")
            return data
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            self.fail("invalid")
        for index, item in enumerate(data):
            kind = item.get("type", "message")
            if not isinstance(kind, str):
                raise serializers.ValidationError(_item_error(index, "type", "Must be a string."))
            if kind != "message":
                continue  # function_call_output, reasoning, ...: vLLM checks them
            if item.get("role") not in _INPUT_ROLES:
                raise serializers.ValidationError(
                    _item_error(index, "role", f"Must be one of {', '.join(_INPUT_ROLES)}.")
                )
            content = item.get("content")
            parts = isinstance(content, list) and all(isinstance(part, dict) for part in content)
            if not (isinstance(content, str) or parts):
                raise serializers.ValidationError(
                    _item_error(index, "content", "Must be a string or a list of content parts.")
                )
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class MetadataField(serializers.Field):
    """`metadata`: up to 16 string pairs, keys up to 64 characters, values up to 512 (OpenAI's bounds)."""

    default_error_messages = {"invalid": "Must be an object of at most 16 string values (keys <= 64, values <= 512)."}

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict) or len(data) > 16:
            self.fail("invalid")
        for key, value in data.items():
            if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
                self.fail("invalid")
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class ResponsesStreamOptionsSerializer(serializers.Serializer):
    """`stream_options` of the Responses API."""

    include_obfuscation = StrictBooleanField(required=False)


class ResponsesRequestSerializer(serializers.Serializer):
    """POST /v1/responses (vLLM's own parameters pass through, as for chat)."""

    model = StrictCharField()
    input = ResponseInputField()
    instructions = StrictCharField(required=False, allow_null=True, allow_blank=True, trim_whitespace=False)
    max_output_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    max_tool_calls = StrictIntegerField(required=False, allow_null=True, min_value=1)
    temperature = StrictFloatField(required=False, allow_null=True, min_value=0.0, max_value=2.0)
    top_p = StrictFloatField(required=False, allow_null=True, min_value=0.0, max_value=1.0)
    top_logprobs = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=20)
    presence_penalty = StrictFloatField(required=False, allow_null=True, min_value=-2.0, max_value=2.0)
    frequency_penalty = StrictFloatField(required=False, allow_null=True, min_value=-2.0, max_value=2.0)
    seed = StrictIntegerField(required=False, allow_null=True)
    stop = StopField(required=False, allow_null=True)
    stream = StrictBooleanField(required=False, allow_null=True)
    stream_options = ResponsesStreamOptionsSerializer(required=False, allow_null=True)
    store = StrictBooleanField(required=False, allow_null=True)
    background = StrictBooleanField(required=False, allow_null=True)
    previous_response_id = StrictCharField(required=False, allow_null=True, max_length=MAX_RESPONSE_ID_CHARS)
    tools = serializers.ListField(child=JSONObjectField(), required=False, allow_null=True)
    tool_choice = serializers.JSONField(required=False, allow_null=True)
    parallel_tool_calls = StrictBooleanField(required=False, allow_null=True)
    text = JSONObjectField(required=False, allow_null=True)
    reasoning = JSONObjectField(required=False, allow_null=True)
    include = serializers.ListField(child=StrictCharField(), required=False, allow_null=True, max_length=16)
    metadata = MetadataField(required=False, allow_null=True)
    truncation = serializers.ChoiceField(choices=["auto", "disabled"], required=False, allow_null=True)
    service_tier = serializers.ChoiceField(
        choices=["auto", "default", "flex", "scale", "priority"], required=False, allow_null=True
    )
    user = StrictCharField(required=False, allow_blank=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """stream_options only on a stream; `conversation` (OpenAI's Conversations API) is not served by vLLM."""
        if attrs.get("stream_options") is not None and not attrs.get("stream"):
            raise serializers.ValidationError({"stream_options": "Only allowed when stream is true."})
        if self.initial_data.get("conversation") is not None:
            raise serializers.ValidationError(
                {"conversation": "Conversations are not supported; use previous_response_id."}
            )
        return attrs


_FAST_KEYS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "stream",
        "store",
        "user",
        "previous_response_id",
    }
)


def _plain(value: Any) -> bool:
    return isinstance(value, str) and "\x00" not in value


def fast_valid_responses(data: dict[str, Any]) -> bool:
    """True only for the common Responses bodies the serializer certainly accepts (else the serializer decides)."""
    if data.keys() - _FAST_KEYS:
        return False
    model = data.get("model")
    if not isinstance(model, str) or not model or model.strip() != model or "\x00" in model:
        return False
    value = data.get("input")
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, dict) or item.keys() - {"role", "content"} or item.get("role") not in _INPUT_ROLES:
                return False
            if not _plain(item.get("content")):
                return False
    elif not _plain(value):
        return False
    if "instructions" in data and not _plain(data["instructions"]):
        return False
    if "max_output_tokens" in data:
        tokens = data["max_output_tokens"]
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            return False
    for key, high in (("temperature", 2.0), ("top_p", 1.0)):
        if key in data:
            number = data[key]
            if not isinstance(number, int | float) or isinstance(number, bool) or not 0.0 <= number <= high:
                return False
    if any(key in data and not isinstance(data[key], bool) for key in ("stream", "store")):
        return False
    if "user" in data and not _plain(data["user"]):
        return False
    if "previous_response_id" in data:
        previous = data["previous_response_id"]
        if not _plain(previous) or not previous.strip() or len(previous) > MAX_RESPONSE_ID_CHARS:
            return False
    return True


# --- the endpoint's hooks ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class ResponsesCall:
    """One Responses exchange: the id the router gave vLLM, the conversation it continues, whether it only reads."""

    inner: str
    previous: StoredRef | None = None
    previous_public: str | None = None
    retrieval: bool = False
    public: str | None = None  # the client's id, for retrieval and cancel


def rewrite_response_object(
    obj: dict[str, Any], *, backend_id: int, model: str, principal: Principal | None, call: ResponsesCall
) -> None:
    """A response object as the client must see it: its id and `previous_response_id` public, its model public."""
    inner = obj.get("id")
    if isinstance(inner, str):
        public = encode_response_id(StoredRef(backend_id, inner, model), principal)
        if public is not None:
            obj["id"] = public
    previous = obj.get("previous_response_id")
    if isinstance(previous, str):
        if call.previous is not None and previous == call.previous.inner and call.previous_public:
            obj["previous_response_id"] = call.previous_public
        else:
            public = encode_response_id(StoredRef(backend_id, previous, model), principal)
            if public is not None:
                obj["previous_response_id"] = public
    if "model" in obj:
        obj["model"] = model


class ResponsesStreamState(StreamState):
    """SSE relay of Responses events: model names and ids rewritten in every event; usage from
    `response.completed` (none for a retrieval: it was charged when generated)."""

    __slots__ = ("backend_id", "call", "completed_usage", "inner_bytes", "model", "principal", "public_bytes")

    def __init__(
        self, *, served: str, requested: str, backend_id: int, principal: Principal | None, call: ResponsesCall
    ) -> None:
        super().__init__(served=served, requested=requested, strip_final=False)
        self.backend_id = backend_id
        self.model = requested
        self.principal = principal
        self.call = call
        self.completed_usage: dict[str, Any] | None = None
        public = call.public or encode_response_id(StoredRef(backend_id, call.inner, requested), principal)
        self.inner_bytes = call.inner.encode() if public else b""
        self.public_bytes = public.encode() if public else b""

    def feed(self, chunk: bytes) -> bytes:
        out = super().feed(chunk)
        if out:
            if self.inner_bytes and self.inner_bytes in out:
                out = out.replace(self.inner_bytes, self.public_bytes)
            if b'"previous_response_id":"' in out:
                out = _PREVIOUS.sub(self._previous, out)
        return out

    def _previous(self, match: re.Match[bytes]) -> bytes:
        inner = match.group(1).decode()
        call = self.call
        if call.previous is not None and inner == call.previous.inner and call.previous_public:
            public: str | None = call.previous_public
        else:
            public = encode_response_id(StoredRef(self.backend_id, inner, self.model), self.principal)
        return b'"previous_response_id":"' + public.encode() + b'"' if public else match.group(0)

    def _usage(self, events: bytes) -> bytes:
        # Called by feed() for events holding `"usage":{`: only response.completed's own usage counts.
        if self.call.retrieval or b"response.completed" not in events:
            return events
        for event in events.split(b"\n\n"):
            if b"response.completed" not in event:
                continue
            data = _event_data(event)
            try:
                payload = orjson.loads(data) if data else None
            except orjson.JSONDecodeError:
                continue
            if isinstance(payload, dict) and payload.get("type") == "response.completed":
                response = payload.get("response")
                usage = response.get("usage") if isinstance(response, dict) else None
                self.completed_usage = usage if isinstance(usage, dict) else None
        return events

    def usage(self) -> dict[str, Any] | None:
        if self.call.retrieval:
            return {"input_tokens": 0, "output_tokens": 0}  # a retrieval generates nothing
        return self.completed_usage


def _event_data(event: bytes) -> bytes:
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


class ResponsesHooks:
    """What `routing.gateway` does differently for the Responses API (see the module docstring)."""

    def prepare(
        self, data: dict[str, Any], *, model: ModelSnap, registry: RegistrySnapshot, principal: Principal | None
    ) -> tuple[BackendSnap | None, ResponsesCall]:
        """Name vLLM's id; pin a follow-up (`previous_response_id`) to the backend storing its conversation."""
        inner = RESPONSE_ID_PREFIX + os.urandom(16).hex()
        data["request_id"] = inner  # the client's own (a vLLM extension) would let it choose another's stored id
        call = ResponsesCall(inner)
        previous = data.get("previous_response_id")
        if previous is None:
            return None, call
        ref = decode_response_id(previous, principal)
        if ref is None:
            raise previous_not_found(str(previous))
        backend = stored_backend(registry, ref, previous, param="previous_response_id")
        if backend.pool not in (model.pool, *model.fallback_pools):
            raise bad_request(
                f"The previous response is stored on a backend that does not serve `{data.get('model')}`; "
                f"continue it with a model served there (it was created with `{ref.model}`).",
                param="previous_response_id",
                code="model_mismatch",
            )
        data["previous_response_id"] = ref.inner
        call.previous, call.previous_public = ref, previous
        return backend, call

    def answer(self, result: dict[str, Any], lc: Lifecycle) -> None:
        """The JSON answer's ids (the gateway has rewritten its model already)."""
        prepared, backend = lc.prepared, lc.backend
        assert prepared is not None and backend is not None
        rewrite_response_object(
            result, backend_id=backend.id, model=prepared.requested, principal=lc.principal, call=prepared.hook_state
        )

    def stream_state(self, lc: Lifecycle) -> StreamState:
        """The SSE relay state of a Responses stream."""
        prepared, backend = lc.prepared, lc.backend
        assert prepared is not None and backend is not None
        return ResponsesStreamState(
            served=prepared.model.served_name,
            requested=prepared.requested,
            backend_id=backend.id,
            principal=lc.principal,
            call=prepared.hook_state,
        )

    def error(self, exc: APIError, lc: Lifecycle) -> APIError:
        """A backend's 4xx as the client must see it: its own 'not found' for stored ids, vLLM's ids replaced."""
        prepared = lc.prepared
        call: ResponsesCall | None = prepared.hook_state if prepared is not None else None
        if call is None or not isinstance(exc, PassthroughError):
            return exc
        if exc.status == 404 and exc.param in ("response_id", "previous_response_id"):
            if call.public is not None:
                return response_not_found(call.public)
            if call.previous_public is not None:
                return previous_not_found(call.previous_public)
        known = [(call.inner, call.public)]
        if call.previous is not None:
            known.append((call.previous.inner, call.previous_public))
        for inner, public in known:
            if public and inner in exc.message:
                exc.message = exc.message.replace(inner, public)
                if exc.raw is not None:
                    exc.raw = exc.raw.replace(inner.encode(), public.encode())
        return exc


RESPONSES_HOOKS = ResponsesHooks()


# --- GET /v1/responses/{id}, POST /v1/responses/{id}/cancel, and what vLLM does not serve --------------------------


@functools.cache
def _stored_endpoints() -> dict[str, Any]:
    from routing.gateway import Endpoint

    def never(data: dict[str, Any]) -> bool:
        return True

    # tokens=False: a retrieval or a cancel generates nothing (counted as a request, exempt from token limits)
    kinds = frozenset({"chat"})
    return {
        "retrieve": Endpoint(
            "responses.retrieve",
            "",
            ResponsesRequestSerializer,
            kinds,
            True,
            never,
            tokens=False,
            hooks=RESPONSES_HOOKS,
        ),
        "cancel": Endpoint(
            "responses.cancel", "", ResponsesRequestSerializer, kinds, False, never, tokens=False, hooks=RESPONSES_HOOKS
        ),
    }


def _retrieve_query(scope: Scope) -> tuple[bool, str]:
    """`stream` and `starting_after` of a retrieval (other OpenAI parameters are ignored, as vLLM does)."""
    raw = scope.get("query_string", b"").decode("latin-1")
    stream = False
    query = ""
    try:
        pairs = parse_qsl(raw, max_num_fields=8)
    except ValueError:
        raise bad_request("Too many query parameters.", code="invalid_query") from None
    values = dict(pairs)
    if "stream" in values:
        if values["stream"] not in ("true", "false"):
            raise bad_request("`stream` must be true or false.", param="stream")
        stream = values["stream"] == "true"
    if stream:
        query = "?stream=true"
        after = values.get("starting_after")
        if after is not None:
            if not after.isdigit() or len(after) > 9:
                raise bad_request("`starting_after` must be a non-negative integer.", param="starting_after")
            query += f"&starting_after={int(after)}"
    return stream, query


async def serve_stored(
    gateway: Gateway, scope: Scope, receive: Receive, send: Send, path: str, request_id: str, started: float
) -> None:
    """`/v1/responses/{id}` (GET), `/v1/responses/{id}/cancel` (POST); DELETE and input_items are not served."""
    from routing import gateway as gw

    method: str = scope["method"]
    public, _, action = path[len(STORED_PATH) :].partition("/")
    if not public or action not in ("", "cancel", "input_items"):
        raise APIError(404, f"Unknown request URL: {method} {scope['path']}.", code="unknown_url")
    if action == "" and method == "DELETE":
        raise APIError(
            405,
            "Deleting a stored response is not supported: vLLM keeps stored responses in its memory and serves no "
            "DELETE; they go when the backend restarts.",
            code="method_not_allowed",
            headers=((b"allow", b"GET"),),
        )
    allowed = "POST" if action == "cancel" else "GET"
    if method != allowed:
        raise gw._method_not_allowed(method, path, allowed)
    if action == "input_items":
        raise APIError(
            404,
            "Listing a stored response's input items is not supported: vLLM does not serve /input_items.",
            code="unsupported_endpoint",
        )
    endpoint = _stored_endpoints()["cancel" if action else "retrieve"]
    lc = gateway.lifecycle(endpoint, request_id, started)
    error: BaseException | None = None
    try:
        lc.principal = await gateway._authenticate(scope)
        if action == "cancel":
            await gw._read_body(receive, 64 * 1024)  # OpenAI's cancel has no body; read (bounded) and ignore it
            stream, query = False, ""
        else:
            stream, query = _retrieve_query(scope)
        ref = decode_response_id(public, lc.principal)
        if ref is None:
            raise response_not_found(public)
        registry = await gateway._registry()
        backend = stored_backend(registry, ref, public)
        model = registry.models.get(ref.model) or registry.unavailable.get(ref.model)
        if model is None:
            raise response_gone(public, f"the model `{ref.model}` it was created with is no longer served")
        call = ResponsesCall(ref.inner, retrieval=True, public=public)
        upstream = f"{STORED_PATH}{ref.inner}" + ("/cancel" if action else query)
        prepared = gw.PreparedRequest(
            endpoint,
            {},
            model,
            ref.model,
            registry,
            stream,
            False,
            RequestContext(endpoint=endpoint.name, pin=backend),
            b"",
            method=allowed,
            path=upstream,
            hook_state=call,
        )
        await lc.admit(prepared, 0)
        if stream:
            await gateway._stream(receive, send, lc)
        else:
            await gw._until_disconnect(_forward_stored(gateway, send, lc, call), receive)
    except APIError as exc:
        error = RESPONSES_HOOKS.error(exc, lc)
        if lc.reservation is not None:
            error.headers = (*error.headers, *lc.limit_headers)
        await gw._send_error(send, error, request_id, internal=lc.internal)
    except BaseException as exc:
        error = exc
        raise
    finally:
        await lc.finish(error)


async def _forward_stored(gateway: Gateway, send: Send, lc: Lifecycle, call: ResponsesCall) -> None:
    """A retrieval or cancel answered in JSON: the stored response object, rewritten; no tokens charged."""
    from routing import errors
    from routing import gateway as gw

    response = await lc.open()
    backend, prepared = lc.backend, lc.prepared
    assert backend is not None and prepared is not None
    if response.status_code != 200:
        raise await lc.upstream_error()
    lc.verdict(True)
    try:
        result = orjson.loads(response.content)
        rewrite_response_object(
            result, backend_id=backend.id, model=prepared.requested, principal=lc.principal, call=call
        )
    except (orjson.JSONDecodeError, AttributeError) as exc:
        raise errors.backend_failed(backend.name, "answered 200 with a body that is not a JSON object") from exc
    lc.take_usage({"input_tokens": 0, "output_tokens": 0})  # generated (and charged) when it was created
    await gw._send_json(send, 200, orjson.dumps(result), gateway._answer_headers(lc))
