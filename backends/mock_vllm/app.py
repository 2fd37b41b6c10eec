"""A fast, deterministic mock of vLLM's OpenAI-compatible HTTP API as a raw ASGI app.

No framework and no Django: the app is a plain ASGI callable (`MockVLLM`) so that it can
serve tens of thousands of requests per second on one core under uvicorn + httptools, and
be driven in-process by `httpx.ASGITransport` in tests.

Shapes follow vLLM's OpenAI server (chat/completions, completions, embeddings, rerank, score,
tokenize, detokenize, models, health, metrics); behaviour is deterministic and can be bent at runtime through the
knobs of `MockConfig` (latency, failures, hangs, broken streams, wrong answers, ...), either
by mutating `app.config` in-process or with `POST /mock/config`.

Like vLLM, each app has an automatic prefix cache (`prefix_cache.PrefixCache`, counted in
``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total``) and can make a cache hit
visibly faster: ``prefill_ms_per_token`` delays the first token by that much per UNCACHED prompt
token. ``stream_options.continuous_usage_stats`` puts a usage object in every streamed chunk.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
import os
import re
import time
import zlib
from array import array
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson

from backends.mock_vllm.kv_events import KvEventPublisher, events_from_journal, kv_event_sources
from backends.mock_vllm.prefix_cache import PrefixCache
from backends.mock_vllm.responses import MockResponses

__all__ = [
    "CHAT_PER_MESSAGE_OVERHEAD",
    "CHAT_REPLY_OVERHEAD",
    "DEFAULT_ANSWER",
    "MockAbort",
    "MockConfig",
    "MockStats",
    "MockVLLM",
    "chat_prompt_text",
    "chat_prompt_token_count",
    "chat_prompt_token_ids",
    "chat_prompt_tokens",
    "count_tokens",
    "embed_text",
    "token_ids",
    "tokenize",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# ---------------------------------------------------------------------------------------------
# Tokenizer: the one deterministic function used for usage, /tokenize, embeddings and limits.
# ---------------------------------------------------------------------------------------------

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# Same tokens as TOKEN_RE, each carrying its leading whitespace, so that "".join(pieces) is the
# text (minus trailing whitespace) and len(pieces) == count_tokens(text).
_PIECE_RE = re.compile(r"\s*(?:\w+|[^\w\s])")

CHAT_PER_MESSAGE_OVERHEAD = 4
"""Tokens added per chat message (role header / separators), as a chat template would."""
CHAT_REPLY_OVERHEAD = 3
"""Tokens added once per chat prompt (the assistant generation prompt)."""

DEFAULT_ANSWER = "This is a deterministic answer from the mock vLLM backend ."
PARIS_ANSWER = "Paris"
_PARIS_TRIGGER = "capital of france"

_TOKEN_ID_BASE = 100
_TOKEN_ID_SPAN = 50_000
_SPECIAL_IDS = {"bos": 1, "eom": 2, "sep": 3}


def tokenize(text: str) -> list[str]:
    """Split text into mock tokens (words and single punctuation marks)."""
    return TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    """Count the mock tokens of a text."""
    return len(TOKEN_RE.findall(text))


def _token_id(token: str) -> int:
    """Map one token string to a stable integer id."""
    return _TOKEN_ID_BASE + zlib.crc32(token.encode()) % _TOKEN_ID_SPAN


_TEMPLATE_IDS = {"\x00bos": _SPECIAL_IDS["bos"], "\x00sep": _SPECIAL_IDS["sep"], "\x00eom": _SPECIAL_IDS["eom"]}


def _event_token_id(token: Any) -> int:
    """The id /tokenize hands out for a prefix-cache token (a token string, a template sentinel, or an id)."""
    if isinstance(token, int):
        return token
    special = _TEMPLATE_IDS.get(token)
    return special if special is not None else _token_id(token)


def token_ids(text: str) -> list[int]:
    """Return the mock token ids of a text (one per token)."""
    return [_token_id(t) for t in TOKEN_RE.findall(text)]


def _content_text(content: Any) -> str:
    """Flatten an OpenAI message content (string or list of parts) into text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
            elif isinstance(part, str):
                texts.append(part)
        return " ".join(texts)
    return str(content)


def chat_prompt_text(messages: list[dict[str, Any]]) -> str:
    """Concatenate the contents of chat messages (what the answer logic looks at)."""
    return "\n".join(_content_text(m.get("content")) for m in messages)


def chat_prompt_token_count(messages: list[dict[str, Any]]) -> int:
    """Count the prompt tokens of a chat request: contents plus a fixed per-message overhead."""
    total = CHAT_REPLY_OVERHEAD
    for m in messages:
        total += CHAT_PER_MESSAGE_OVERHEAD + len(TOKEN_RE.findall(_content_text(m.get("content"))))
    return total


def chat_prompt_token_ids(messages: list[dict[str, Any]]) -> list[int]:
    """Return mock token ids of a chat prompt; its length equals `chat_prompt_token_count`."""
    ids: list[int] = []
    for m in messages:
        ids += [_SPECIAL_IDS["bos"], _token_id(str(m.get("role", ""))), _SPECIAL_IDS["sep"]]
        ids += token_ids(_content_text(m.get("content")))
        ids.append(_SPECIAL_IDS["eom"])
    ids += [_SPECIAL_IDS["bos"], _token_id("assistant"), _SPECIAL_IDS["sep"]]
    return ids


_TEMPLATE_BOS, _TEMPLATE_SEP, _TEMPLATE_EOM = "\x00bos", "\x00sep", "\x00eom"  # never produced by TOKEN_RE
_GENERATION_PROMPT = (_TEMPLATE_BOS, "assistant", _TEMPLATE_SEP)
_TEMPLATE_TEXTS = {_TEMPLATE_BOS: "<|im_start|>", _TEMPLATE_SEP: "\n", _TEMPLATE_EOM: "<|im_end|>"}
"""The token strings /tokenize gives (return_token_strs) for the template's special tokens (ChatML's)."""


def chat_prompt_tokens(messages: list[dict[str, Any]]) -> list[str]:
    """Return the mock tokens of a chat prompt as the engine sees it (the template, message by message).

    Token for token the same sequence as `chat_prompt_token_ids` (strings instead of ids, special
    tokens as sentinels): per message a header (bos, role, sep), the content's tokens and an
    end-of-message token, then the generation prompt. Earlier turns are therefore a prefix of a
    later turn's prompt, which is what the prefix cache keys on.
    """
    tokens: list[str] = []
    for m in messages:
        tokens += (_TEMPLATE_BOS, str(m.get("role", "")), _TEMPLATE_SEP)
        tokens += TOKEN_RE.findall(_content_text(m.get("content")))
        tokens.append(_TEMPLATE_EOM)
    tokens += _GENERATION_PROMPT
    return tokens


def _pieces(text: str) -> list[str]:
    """Split generated text into streamable token pieces (tokens with leading whitespace)."""
    return _PIECE_RE.findall(text)


def embed_text(tokens: Iterable[str | int], dim: int = 384) -> list[float]:
    """Embed tokens as an L2-normalised bag of hashed buckets (deterministic)."""
    counts: dict[int, int] = {}
    for tok in tokens:
        key = tok.lower().encode() if isinstance(tok, str) else str(tok).encode()
        bucket = zlib.crc32(key) % dim
        counts[bucket] = counts.get(bucket, 0) + 1
    vec = [0.0] * dim
    if counts:
        inv = 1.0 / math.sqrt(sum(c * c for c in counts.values()))
        for bucket, c in counts.items():
            vec[bucket] = c * inv
    return vec


# ---------------------------------------------------------------------------------------------
# Configuration and counters.
# ---------------------------------------------------------------------------------------------


@dataclass
class MockConfig:
    """Knobs of the mock; every field can be changed at runtime (in-process or POST /mock/config)."""

    models: list[str] = field(default_factory=lambda: ["mock-chat"])
    """Served generative model names (chat + completions)."""
    embed_models: list[str] = field(default_factory=lambda: ["mock-embed"])
    """Served embedding model names (/v1/embeddings; rerank and score as a bi-encoder, as vLLM)."""
    rerank_models: list[str] = field(default_factory=list)
    """Served cross-encoder (reranker) model names: rerank and score only, as vLLM serves a `classify` model with one
    label."""
    max_model_len: int = 2048
    latency_s: float = 0.0
    """Simulated prefill: delay before a successful answer. Streams send their headers at once (like
    vLLM) and the first chunk after this delay; errors (injected or validation) are not delayed."""
    token_delay_s: float = 0.0
    """Delay between streamed tokens (non-streaming responses wait this per generated token)."""
    prefill_ms_per_token: float = 0.0
    """Prefill cost: milliseconds added before the first token per prompt token NOT found in the
    prefix cache (on top of latency_s), so a cache hit has a visibly shorter time to first token."""
    prefix_cache_blocks: int = 4096
    """Capacity of the LRU prefix cache in blocks (0 disables it, like --no-enable-prefix-caching)."""
    prefix_cache_block_size: int = 16
    """Tokens per prefix-cache block (vLLM: 16 on GPUs, 128 on the CPU build)."""
    kv_events_port: int | None = None
    """Publish the prefix cache's KV-cache events as vLLM does (ZMQ PUB on 127.0.0.1:PORT; kv_events.py)."""
    fail_status: int | None = None
    """When set, every work request answers this status with a JSON error."""
    fail_next: int = 0
    """The next N work requests fail with `fail_status` (or 500)."""
    hang: bool = False
    """Accept work requests and never answer; they end when the client disconnects."""
    die_after_tokens: int | None = None
    """In a stream, abort the connection abruptly after this many token chunks."""
    answer_override: str | None = None
    """Answer this text instead of the deterministic answer."""
    error_message_override: str | None = None
    """When set, work requests fail (fail_status or 500) with this error message."""
    usage_prompt_tokens_offset: int = 0
    """Added to the reported usage.prompt_tokens (to simulate token count mismatches)."""
    num_requests_waiting: int = 0
    kv_cache_usage_perc: float = 0.0
    models_listed: list[str] | None = None
    """Override the ids listed by /v1/models (None: the served models)."""
    health_status: int = 200
    """Status answered by GET /health."""
    fill_to_max_tokens: bool = True
    """The default answer repeats to fill max_tokens when the request sets it (finish 'length')."""
    responses_store: bool = True
    """Store Responses API answers in memory (vLLM: VLLM_ENABLE_RESPONSES_API_STORE=1; its default is off)."""
    embedding_dim: int = 384

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a JSON-able dict."""
        return dataclasses.asdict(self)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a dict of field changes in place; unknown fields raise KeyError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise KeyError(f"unknown MockConfig field(s): {', '.join(unknown)}")
        for key, value in changes.items():
            setattr(self, key, list(value) if isinstance(value, list) else value)


@dataclass
class MockStats:
    """Request counters; work requests satisfy open + completed + failed + cancelled == total."""

    open_requests: int = 0
    total_requests: int = 0
    completed_requests: int = 0
    """Work requests fully answered with a status < 400."""
    failed_requests: int = 0
    """Work requests answered with an error status, or aborted by die_after_tokens."""
    cancelled_requests: int = 0
    """Work requests ended by the client disconnecting before the answer was complete."""
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries_total: int = 0
    """Prompt tokens looked up in the prefix cache (vLLM's vllm:prefix_cache_queries)."""
    prefix_cache_hits_total: int = 0
    """Of those, tokens found cached (vLLM's vllm:prefix_cache_hits)."""
    by_path: dict[str, int] = field(default_factory=dict)
    """Count of requests per path (every path except /mock/*)."""
    last_request: Any = None
    """The last JSON body received by a work endpoint."""
    last_raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list, repr=False)

    @property
    def last_headers(self) -> dict[str, str]:
        """Headers of the last work request, decoded, lower-case names."""
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self.last_raw_headers}

    def to_dict(self) -> dict[str, Any]:
        """Return the counters as the JSON-able dict served at GET /mock/stats."""
        return {
            "open_requests": self.open_requests,
            "total_requests": self.total_requests,
            "completed_requests": self.completed_requests,
            "failed_requests": self.failed_requests,
            "cancelled_requests": self.cancelled_requests,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "prefix_cache_queries_total": self.prefix_cache_queries_total,
            "prefix_cache_hits_total": self.prefix_cache_hits_total,
            "by_path": dict(self.by_path),
            "last_request": self.last_request,
            "last_headers": self.last_headers,
        }

    def reset(self) -> None:
        """Zero the counters; open_requests is a live gauge and is kept."""
        open_requests = self.open_requests
        fresh = MockStats(open_requests=open_requests)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


class MockAbort(Exception):
    """Raised inside a stream to make the server drop the connection (die_after_tokens)."""


class _HTTPError(Exception):
    """An error answered as a vLLM-shaped JSON error response."""

    def __init__(self, status: int, message: str, err_type: str | None = None, param: str | None = None) -> None:
        """Describe the error response: HTTP status, message, vLLM error type and offending param."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or _error_type(status)
        self.param = param


class _Disconnected(Exception):
    """The client went away while the request body was being read."""


def _error_type(status: int) -> str:
    """Name the error type of a status the way vLLM does (BadRequestError, NotFoundError, ...)."""
    special = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
    if status in special:
        return special[status]
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"


def _error_body(status: int, message: str, err_type: str | None = None, param: str | None = None) -> bytes:
    """Serialise a vLLM ErrorResponse body."""
    error = {"message": message, "type": err_type or _error_type(status), "param": param, "code": status}
    return orjson.dumps({"error": error})


# ---------------------------------------------------------------------------------------------
# Precomputed constants.
# ---------------------------------------------------------------------------------------------

_JSON_CT = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_METRICS_CT = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
_DONE = b"data: [DONE]\n\n"
_EMPTY_BODY: Message = {"type": "http.response.body", "body": b"", "more_body": False}
_DEFAULT_PIECES: list[str] = _pieces(DEFAULT_ANSWER)
_VLLM_VERSION = b'{"version":"0.32.0"}'
_NOT_FOUND = b'{"detail":"Not Found"}'
_FINGERPRINT = "vllm-0.32.0-mock"
_TOKEN_TEXTS_MAX = 65_536
_FINGERPRINT_TAIL = b',"system_fingerprint":"' + _FINGERPRINT.encode() + b'"}\n\n'
# Keys vLLM 0.32 puts (null unless asked for) at the top level of every non-streamed chat/completion response.
_TRANSFER_NULLS: dict[str, None] = {"kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def _repeat_pieces(base: list[str], n: int) -> list[str]:
    """Repeat an answer's pieces until there are exactly n (a space joins the repetitions)."""
    if not base:
        return []
    unit = [" " + base[0].lstrip(), *base[1:]]
    out = list(base)
    while len(out) < n:
        out += unit
    return out[:n]


_DEFAULT_FILL_CACHE: list[str] = _repeat_pieces(_DEFAULT_PIECES, 4096)


def _rid() -> str:
    """Return a random request id suffix (16 hex chars, like vLLM 0.32)."""
    return os.urandom(8).hex()


# ---------------------------------------------------------------------------------------------
# The ASGI application.
# ---------------------------------------------------------------------------------------------


class _Plan:
    """What one choice will generate."""

    __slots__ = ("finish_reason", "pieces", "stop_reason", "text")

    def __init__(self, pieces: list[str], finish_reason: str, stop_reason: str | None) -> None:
        """Store the generated pieces, their text and why generation finished."""
        self.pieces = pieces
        self.text = "".join(pieces)
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason


class MockVLLM:
    """Raw ASGI app imitating a vLLM OpenAI-compatible server; see the module docstring."""

    def __init__(self, config: MockConfig | None = None, **overrides: Any) -> None:
        """Build the app from a MockConfig and/or MockConfig field overrides (kwargs)."""
        cfg = MockConfig(**_deepcopy_fields(config)) if config is not None else MockConfig()
        cfg.update(overrides)
        self.config: MockConfig = cfg
        self._defaults: MockConfig = MockConfig(**_deepcopy_fields(cfg))
        self.stats: MockStats = MockStats()
        self.created: int = int(time.time())
        self.prefix_cache = PrefixCache(cfg.prefix_cache_blocks, cfg.prefix_cache_block_size)
        self._prefix_cache_size = (cfg.prefix_cache_blocks, cfg.prefix_cache_block_size)
        self.sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
        self._kv_publisher: KvEventPublisher | None = None
        if cfg.kv_events_port is not None:
            self._kv_events_publisher()  # bound at start, as vLLM's publisher is
        self.responses = MockResponses(self)
        """The Responses API and its in-memory store (`backends.mock_vllm.responses`)."""
        """Waits before the first token (latency_s + prefill); tests may swap in a recording fake."""
        self._get_routes: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            "/health": self._health,
            "/ping": self._health,
            "/v1/models": self._models,
            "/metrics": self._metrics,
            "/version": self._version,
            "/kv_event_sources": self._kv_event_sources,
            "/mock/stats": self._mock_stats,
            "/mock/config": self._mock_get_config,
        }
        self._work_routes: dict[str, Callable[[dict[str, Any], Send], Awaitable[int]]] = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/embeddings": self._embeddings,
            "/rerank": self._rerank,
            "/v1/rerank": self._rerank,
            "/v2/rerank": self._rerank,
            "/score": self._score,
            "/v1/score": self._score,
            "/v1/responses": self.responses.create,
            "/tokenize": self._tokenize,
            "/detokenize": self._detokenize,
        }
        self._token_texts: dict[int, str] = {}
        """Token id -> text of the tokens /tokenize handed out (bounded), so that /detokenize can invert them."""
        self._control_routes: dict[str, Callable[[bytes, Send], Awaitable[None]]] = {
            "/mock/config": self._mock_set_config,
            "/mock/reset": self._mock_reset,
        }

    # -- public helpers ------------------------------------------------------------------------

    def reset(self) -> None:
        """Restore the construction-time configuration (in place), zero the counters, empty the prefix cache."""
        for key, value in _deepcopy_fields(self._defaults).items():
            setattr(self.config, key, value)
        self.stats.reset()
        self.prefix_cache.clear()
        self.responses.reset()

    # -- ASGI entry point ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch one ASGI connection scope."""
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await _lifespan(receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if not path.startswith("/mock/"):
            by_path = self.stats.by_path
            by_path[path] = by_path.get(path, 0) + 1
        if method == "POST":
            work = self._work_routes.get(path)
            if work is not None:
                await self._serve_work(work, scope, receive, send)
                return
            control = self._control_routes.get(path)
            if control is not None:
                try:
                    body = await _read_body(receive)
                except _Disconnected:
                    return
                await control(body, send)
                return
        elif method in ("GET", "HEAD"):
            handler = self._get_routes.get(path)
            if handler is not None:
                await handler(scope, receive, send)
                return
        if path.startswith("/v1/responses/"):
            await self.responses.serve_stored(scope, receive, send, path)
            return
        if path in self._get_routes or path in self._work_routes or path in self._control_routes:
            await _send_json(send, 405, b'{"detail":"Method Not Allowed"}')
        else:
            await _send_json(send, 404, b'{"detail":"Not Found"}')

    # -- work endpoints: accounting, knobs, cancellation -----------------------------------------

    async def _serve_work(
        self,
        handler: Callable[[dict[str, Any], Send], Awaitable[int]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Serve a POST work endpoint: count it, apply the knobs, watch for client disconnects."""
        stats = self.stats
        cfg = self.config
        try:
            raw = await _read_body(receive)
        except _Disconnected:
            return
        stats.open_requests += 1
        stats.total_requests += 1
        stats.last_raw_headers = scope["headers"]
        outcome = "failed"
        try:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                body = None
                parse_error: _HTTPError | None = _json_error(exc)
            else:
                parse_error = None
                if not isinstance(body, dict):
                    parse_error = _validation_error(
                        "body",
                        "model_attributes_type",
                        "Input should be a valid dictionary or object to extract fields from",
                    )
            stats.last_request = body

            stream = bool(body.get("stream")) if isinstance(body, dict) else False
            if not (stream or cfg.hang or cfg.latency_s > 0 or cfg.token_delay_s > 0 or cfg.prefill_ms_per_token > 0):
                status = await self._respond(handler, body, parse_error, send)
            else:
                job = asyncio.ensure_future(self._respond_slowly(handler, body, parse_error, send))
                watcher = asyncio.ensure_future(_wait_disconnect(receive))
                try:
                    await asyncio.wait((job, watcher), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not job.done():
                        job.cancel()
                        outcome = "cancelled"
                    watcher.cancel()
                    await asyncio.gather(job, watcher, return_exceptions=True)
                if outcome == "cancelled":
                    return
                status = job.result()  # re-raises MockAbort so that the server drops the connection
            outcome = "completed" if status < 400 else "failed"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            stats.open_requests -= 1
            if outcome == "completed":
                stats.completed_requests += 1
            elif outcome == "cancelled":
                stats.cancelled_requests += 1
            else:
                stats.failed_requests += 1

    async def _respond_slowly(
        self,
        handler: Callable[[dict[str, Any], Send], Awaitable[int]],
        body: Any,
        parse_error: _HTTPError | None,
        send: Send,
    ) -> int:
        """Apply hang, then respond (handlers apply latency_s / token_delay_s themselves)."""
        if self.config.hang:
            await asyncio.Future()  # never completes; cancelled on client disconnect
        return await self._respond(handler, body, parse_error, send)

    async def _respond(
        self,
        handler: Callable[[dict[str, Any], Send], Awaitable[int]],
        body: Any,
        parse_error: _HTTPError | None,
        send: Send,
    ) -> int:
        """Inject failures, report parse errors, otherwise run the endpoint handler."""
        cfg = self.config
        try:
            if cfg.fail_status is not None or cfg.fail_next > 0 or cfg.error_message_override is not None:
                status = cfg.fail_status or 500
                if cfg.fail_next > 0:
                    cfg.fail_next -= 1
                if cfg.error_message_override is not None:
                    message = cfg.error_message_override
                else:
                    message = f"Mock vLLM injected failure: {status} {_phrase(status)}"
                raise _HTTPError(status, message)
            if parse_error is not None:
                raise parse_error
            return await handler(body, send)
        except _HTTPError as err:
            await _send_error(send, err)
            return err.status
        except (MockAbort, asyncio.CancelledError):
            raise
        except Exception as exc:  # a request shape the mock did not anticipate: answer like vLLM would
            await _send_error(send, _HTTPError(500, f"{type(exc).__name__}: {exc}"))
            return 500

    # -- helpers shared by generation endpoints --------------------------------------------------

    def _check_model(self, body: dict[str, Any], embedding: bool) -> str:
        """Resolve the requested model name, or raise 404 (unknown) / 400 (wrong task)."""
        cfg = self.config
        served = cfg.embed_models if embedding else cfg.models
        model = body.get("model")
        if model is None:
            if not served:
                raise _HTTPError(404, "No model is served for this endpoint.", param="model")
            return served[0]
        if model in served:
            return model
        other = cfg.models if embedding else [*cfg.embed_models, *cfg.rerank_models]
        if model in other:
            api = "Embeddings API" if embedding else "Generation API"
            raise _HTTPError(400, f"The model does not support {api}", param="model")
        if embedding:  # vLLM's pooling servers name no aliases and no param
            raise _HTTPError(404, f"The model `{model}` does not exist.")
        raise _HTTPError(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.", param="model")

    def _max_tokens(self, body: dict[str, Any]) -> int | None:
        """Read max_completion_tokens / max_tokens, validating it."""
        value = body.get("max_completion_tokens")
        if value is None:
            value = body.get("max_tokens")
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _HTTPError(
                400,
                f"max_tokens must be at least 1, got {value!r}. (parameter=max_tokens, value={value!r})",
                param="max_tokens",
            )
        limit = self.config.max_model_len
        if value > limit:
            raise _HTTPError(
                400,
                f"max_tokens={value} cannot be greater than max_model_len={limit}. Please request fewer "
                f"output tokens. (parameter=max_tokens, value={value})",
                param="max_tokens",
            )
        return value

    def _n(self, body: dict[str, Any]) -> int:
        """Read and validate n (number of choices)."""
        n = body.get("n", 1)
        if n is None:
            return 1
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise _HTTPError(400, f"n must be at least 1, got {n!r}.")  # vLLM names no param here
        return n

    def _check_length(self, prompt_tokens: int, generative: bool = True) -> int:
        """Raise vLLM's context-length 400 for a too long prompt; return the tokens left for output.

        Like vLLM 0.32, prompt + max_tokens > max_model_len is not an error: generation simply stops
        (finish_reason 'length') when the context is full.
        """
        limit = self.config.max_model_len
        if prompt_tokens > limit or (generative and prompt_tokens >= limit):
            raise _HTTPError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your prompt contains at "
                f"least {prompt_tokens} input tokens, which exceeds this limit even without any output "
                f"tokens. Please reduce the length of the input prompt. "
                f"(parameter=input_tokens, value={prompt_tokens})",
                "BadRequestError",
                "input_tokens",
            )
        return limit - prompt_tokens

    def _plan(self, prompt_text: str, body: dict[str, Any], max_tokens: int | None, room: int) -> _Plan:
        """Decide the deterministic generation for a prompt (room: tokens left in the context)."""
        cfg = self.config
        fill = bool(body.get("ignore_eos"))
        if cfg.answer_override is not None:
            base = _pieces(cfg.answer_override)
        elif _PARIS_TRIGGER in prompt_text.lower():
            base = [PARIS_ANSWER]
        else:
            base = _DEFAULT_PIECES
            fill = fill or cfg.fill_to_max_tokens
        if max_tokens is None:
            # vLLM's default max_tokens is the room left in the context; answers stop naturally.
            cap, fill = room, bool(body.get("ignore_eos"))
        else:
            cap = min(max_tokens, room)
        if fill:
            if base is _DEFAULT_PIECES and cap <= len(_DEFAULT_FILL_CACHE):
                pieces = _DEFAULT_FILL_CACHE[:cap]
            else:
                pieces = _repeat_pieces(base, cap)
            finish = "length" if pieces else "stop"
        elif len(base) > cap:
            pieces, finish = base[:cap], "length"
        else:
            pieces, finish = list(base), "stop"
        stop_reason: str | None = None
        stop = body.get("stop")
        if stop:
            if isinstance(stop, str):
                stops = [stop]
            elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
                stops = [s for s in stop if s]
            else:
                raise _HTTPError(400, "`stop` must be a string or a list of strings.", param="stop")
            text = "".join(pieces)
            cut = -1
            for s in stops:
                pos = text.find(s)
                if pos != -1 and (cut == -1 or pos < cut):
                    cut, stop_reason = pos, s
            if cut != -1:
                pieces, finish = _pieces(text[:cut]), "stop"
        return _Plan(pieces, finish, stop_reason)

    def _first_token_delay(self, uncached_tokens: int) -> float:
        """Return the wait before the first token: latency_s plus the prefill of the uncached tokens."""
        cfg = self.config
        return cfg.latency_s + uncached_tokens * cfg.prefill_ms_per_token / 1000.0

    async def _generation_delay(self, plans: list[_Plan], uncached_tokens: int = 0) -> None:
        """Wait the first-token delay, then token_delay_s per generated token (non-streaming responses)."""
        cfg = self.config
        first = self._first_token_delay(uncached_tokens)
        if first > 0:
            await self.sleep(first)
        if cfg.token_delay_s > 0 and plans:
            await asyncio.sleep(cfg.token_delay_s * max(len(p.pieces) for p in plans))

    def _account(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Add token counts to the metrics counters."""
        self.stats.prompt_tokens_total += prompt_tokens
        self.stats.generation_tokens_total += completion_tokens

    def _prefix_cache_enabled(self) -> bool:
        """Tell whether the prefix cache is on, applying a changed size (POST /mock/config) first."""
        cfg = self.config
        size = (cfg.prefix_cache_blocks, cfg.prefix_cache_block_size)
        if size != self._prefix_cache_size:
            self.prefix_cache.configure(*size)
            self._prefix_cache_size = size
        return self.prefix_cache.capacity > 0

    def _prefix_lookup(self, tokens: list[Any]) -> int:
        """Look a prompt up in the prefix cache and cache its blocks; count and return the hit tokens.

        Like vLLM, nothing is counted when prefix caching is disabled.
        """
        if not self._prefix_cache_enabled():
            return 0
        publisher = self._kv_events_publisher()
        cache = self.prefix_cache
        cache.journal = [] if publisher is not None else None
        hit = cache.match_and_insert(tokens)
        if publisher is not None and cache.journal:
            ids = [_event_token_id(t) for t in tokens]
            publisher.publish(events_from_journal(cache.journal, ids, cache.block_size))
        cache.journal = None
        self.stats.prefix_cache_queries_total += len(tokens)
        self.stats.prefix_cache_hits_total += hit
        return hit

    def _kv_events_publisher(self) -> KvEventPublisher | None:
        """The KV-cache event publisher of the configured port (re-bound when the port changes; None: off)."""
        port = self.config.kv_events_port
        current = self._kv_publisher
        if current is not None and current.port != port:
            current.close()
            current = self._kv_publisher = None
        if current is None and port is not None:
            current = self._kv_publisher = KvEventPublisher(port)
        return current

    def close(self) -> None:
        """Release what the app holds outside its event loop (the KV-cache event socket)."""
        if self._kv_publisher is not None:
            self._kv_publisher.close()
            self._kv_publisher = None

    # -- /v1/chat/completions ------------------------------------------------------------------

    async def _chat(self, body: dict[str, Any], send: Send) -> int:
        """Serve POST /v1/chat/completions."""
        model = self._check_model(body, embedding=False)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            if messages is None:
                raise _validation_error("body.messages", "missing", "Field required")
            raise _validation_error("body.messages", "list_type", "Input should be a non-empty list of message objects")
        max_tokens = self._max_tokens(body)
        n = self._n(body)
        cached = self._prefix_cache_enabled()
        tokens = chat_prompt_tokens(messages) if cached else None
        prompt_tokens = len(tokens) if tokens is not None else chat_prompt_token_count(messages)
        room = self._check_length(prompt_tokens)
        plan = self._plan(chat_prompt_text(messages), body, max_tokens, room)
        uncached = prompt_tokens - self._prefix_lookup(tokens) if tokens is not None else prompt_tokens
        completion_tokens = len(plan.pieces) * n
        reported_prompt = prompt_tokens + self.config.usage_prompt_tokens_offset
        self._account(prompt_tokens, completion_tokens)
        rid = "chatcmpl-" + _rid()
        created = int(time.time())
        if body.get("stream"):
            include_usage, continuous = _usage_options(body)
            usage = _stream_usage(reported_prompt, completion_tokens) if include_usage else None
            prefix = _chunk_prefix(rid, "chat.completion.chunk", created, model)
            per_prompt = [reported_prompt] if continuous else None
            return await self._stream(
                send, prefix, [plan], n, chat=True, usage=usage, uncached=uncached, continuous=per_prompt
            )
        await self._generation_delay([plan], uncached)
        message = {
            "role": "assistant",
            "content": plan.text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        }
        choices = [
            {
                "index": i,
                "message": message,
                "logprobs": None,
                "finish_reason": plan.finish_reason,
                "stop_reason": plan.stop_reason,
                "token_ids": None,
                "routed_experts": None,
            }
            for i in range(n)
        ]
        payload = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": _FINGERPRINT,
            "usage": _usage(reported_prompt, completion_tokens),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            **_TRANSFER_NULLS,
        }
        await _send_json(send, 200, orjson.dumps(payload))
        return 200

    # -- /v1/completions -------------------------------------------------------------------------

    async def _completions(self, body: dict[str, Any], send: Send) -> int:
        """Serve POST /v1/completions (string, token-id, or batched prompts)."""
        model = self._check_model(body, embedding=False)
        prompts = _completion_prompts(body.get("prompt"))
        max_tokens = self._max_tokens(body)
        n = self._n(body)
        prompt_tokens = 0
        plans: list[_Plan] = []
        for text, tokens in prompts:
            room = self._check_length(len(tokens))
            prompt_tokens += len(tokens)
            plans.append(self._plan(text, body, max_tokens, room))
        uncached = prompt_tokens
        if self._prefix_cache_enabled():
            for _, tokens in prompts:
                uncached -= self._prefix_lookup(tokens)
        completion_tokens = sum(len(p.pieces) for p in plans) * n
        offset = self.config.usage_prompt_tokens_offset
        reported_prompt = prompt_tokens + offset
        self._account(prompt_tokens, completion_tokens)
        rid = "cmpl-" + _rid()
        created = int(time.time())
        if body.get("stream"):
            include_usage, continuous = _usage_options(body)
            usage = _stream_usage(reported_prompt, completion_tokens) if include_usage else None
            prefix = _chunk_prefix(rid, "text_completion", created, model)
            per_prompt = [len(tokens) + offset for _, tokens in prompts] if continuous else None
            return await self._stream(
                send, prefix, plans, n, chat=False, usage=usage, uncached=uncached, continuous=per_prompt
            )
        await self._generation_delay(plans, uncached)
        choices = [
            {
                "index": p_idx * n + i,
                "text": plan.text,
                "logprobs": None,
                "finish_reason": plan.finish_reason,
                "stop_reason": plan.stop_reason,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "token_ids": None,
                "routed_experts": None,
            }
            for p_idx, plan in enumerate(plans)
            for i in range(n)
        ]
        payload = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": _FINGERPRINT,
            "usage": _usage(reported_prompt, completion_tokens),
            **_TRANSFER_NULLS,
        }
        await _send_json(send, 200, orjson.dumps(payload))
        return 200

    # -- streaming -------------------------------------------------------------------------------

    async def _stream(
        self,
        send: Send,
        prefix: bytes,
        plans: list[_Plan],
        n: int,
        *,
        chat: bool,
        usage: dict[str, Any] | None,
        uncached: int = 0,
        continuous: list[int] | None = None,
    ) -> int:
        """Stream plans as SSE like vLLM: role chunk (chat), one chunk per token, finish, usage, [DONE].

        The finish_reason rides on the last token's chunk when generation was cut (length or a stop
        string), and comes in an extra empty chunk on a natural stop (the EOS token has no text).
        Choices (n, and the prompts of a batched completion) are interleaved token by token.
        The first chunk waits latency_s plus the prefill of the uncached prompt tokens (headers go
        out at once). continuous: the prompt tokens of each plan when every chunk carries a usage
        object (stream_options.continuous_usage_stats), else None.
        """
        cfg = self.config
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        first = self._first_token_delay(uncached)
        if first > 0:
            await self.sleep(first)  # prefill: headers are out, the first chunk is not
        choices = [
            (str(p_idx * n + i).encode(), plan, continuous[p_idx] if continuous else 0)
            for p_idx, plan in enumerate(plans)
            for i in range(n)
        ]
        if chat:
            for index, _, prompt in choices:
                data = prefix + index + _ROLE_TAIL
                data = _with_usage(data, prompt, 0, chat) if continuous else data
                await _chunk(send, data[:-3] + _ROLE_EXTRA)
            head, tail = b',"delta":{"content":', b'},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
        else:
            head = b',"text":'
            tail = (
                b',"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}'
                b"\n\n"
            )
        die_after = cfg.die_after_tokens
        delay = cfg.token_delay_s
        longest = max(len(plan.pieces) for plan in plans)
        # vLLM sends system_fingerprint once, in the stream's last chunk: the usage chunk, else the last finish.
        trailing = [c for c in choices if not _finish_on_last_token(c[1])]
        if usage is not None:
            last = None
        else:
            last = trailing[-1] if trailing else [c for c in choices if len(c[1].pieces) == longest][-1]
        sent = 0
        for pos in range(longest):
            if pos and delay > 0:
                await asyncio.sleep(delay)
            for entry in choices:
                index, plan, prompt = entry
                pieces = plan.pieces
                if pos >= len(pieces):
                    continue
                if die_after is not None and sent >= die_after:
                    raise MockAbort(_die_message(die_after))
                content = orjson.dumps(pieces[pos])
                if pos == len(pieces) - 1 and _finish_on_last_token(plan):
                    data = prefix + index + _finish_tail(plan, chat, content)
                    if entry is last:
                        data = data[:-3] + _FINGERPRINT_TAIL
                else:
                    data = prefix + index + head + content + tail
                await _chunk(send, _with_usage(data, prompt, pos + 1, chat) if continuous else data)
                sent += 1
            if delay <= 0:
                await asyncio.sleep(0)  # let disconnect watchers and other requests run
        if die_after is not None and sent >= die_after and longest:
            raise MockAbort(_die_message(die_after))
        for entry in trailing:
            index, plan, prompt = entry
            data = prefix + index + _finish_tail(plan, chat, b'""')
            if entry is last:
                data = data[:-3] + _FINGERPRINT_TAIL
            await _chunk(send, _with_usage(data, prompt, len(plan.pieces), chat) if continuous else data)
        await self._stream_end(send, prefix, usage)
        return 200

    async def _stream_end(self, send: Send, prefix: bytes, usage: dict[str, Any] | None) -> None:
        """Send the optional usage chunk, then [DONE], and finish the response."""
        if usage is not None:
            # prefix ends with '"choices":[{"index":' -> turn it into '"choices":[],"usage":{...}}'
            head = prefix[: -len(b'[{"index":')]
            await _chunk(send, head + b'[],"usage":' + orjson.dumps(usage) + _FINGERPRINT_TAIL)
        await send({"type": "http.response.body", "body": _DONE, "more_body": False})

    # -- /v1/embeddings --------------------------------------------------------------------------

    async def _embeddings(self, body: dict[str, Any], send: Send) -> int:
        """Serve POST /v1/embeddings (string, list of strings, token list(s); float or base64)."""
        if body.get("model") in self.config.rerank_models:  # a cross-encoder server has no embeddings route
            await _send_json(send, 404, _NOT_FOUND)
            return 404
        model = self._check_model(body, embedding=True)
        inputs = _embedding_inputs(body.get("input"))
        dim = self.config.embedding_dim
        b64 = body.get("encoding_format") == "base64"
        data: list[dict[str, Any]] = []
        total = 0
        for i, tokens in enumerate(inputs):
            self._check_length(len(tokens), generative=False)
            total += len(tokens)
            vec = embed_text(tokens, dim)
            emb: Any = base64.b64encode(array("f", vec).tobytes()).decode() if b64 else vec
            data.append({"index": i, "object": "embedding", "embedding": emb})
        self._account(total, 0)
        await self._generation_delay([])
        reported = total + self.config.usage_prompt_tokens_offset
        payload = {
            "id": "embd-" + _rid(),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": _usage(reported, 0),
        }
        await _send_json(send, 200, orjson.dumps(payload))
        return 200

    # -- /rerank, /score (vLLM's pooling/scoring API) ---------------------------------------------

    def _check_scoring_model(self, body: dict[str, Any]) -> tuple[str, bool] | None:
        """The scoring model and whether it is a cross-encoder; None when its server has no scoring route (vLLM
        registers rerank and score only on pooling servers); 404 for a model not served."""
        cfg = self.config
        model = body.get("model")
        scoring = [*cfg.embed_models, *cfg.rerank_models]
        if model is None:
            if not scoring:
                return None
            model = scoring[0]
        if model in cfg.models or (model not in scoring and not scoring):
            return None
        if model not in scoring:
            raise _HTTPError(404, f"The model `{model}` does not exist.")
        return model, model in cfg.rerank_models

    def _score_pairs(
        self, cross: bool, first: list[Any], second: list[Any], body: dict[str, Any]
    ) -> tuple[list[float], int]:
        """Score 1:N or N:N texts like vLLM (bi-encoder: cosine of the embeddings; cross-encoder: one pass per
        pair); return the scores and the prompt tokens used."""
        for value in (*first, *second):
            if not isinstance(value, str):  # {"content": [...]}: the mock's models are text-only, as vLLM's BERTs
                raise _HTTPError(400, "MultiModalParam is not supported for BertModel")
        if len(first) > 1 and len(first) != len(second):
            raise _HTTPError(400, "Input lengths must be either 1:1, 1:N or N:N")
        if not first:
            raise _HTTPError(400, "At least one text element must be given")
        if not second:
            raise _HTTPError(400, "At least one text_pair element must be given")
        per_query = _positive(body, "max_tokens_per_query")
        per_doc = _positive(body, "max_tokens_per_doc")
        queries = [tokenize(q)[: per_query or None] for q in first]
        docs = [tokenize(d)[: per_doc or None] for d in second]
        pairs = [(queries[0] if len(queries) == 1 else queries[i], doc) for i, doc in enumerate(docs)]
        dim = self.config.embedding_dim
        if cross:
            for query, doc in pairs:
                self._check_length(len(query) + len(doc), generative=False)
            used = sum(len(q) + len(d) for q, d in pairs)
        else:
            for tokens in (*queries, *docs):
                self._check_length(len(tokens), generative=False)
            used = sum(len(t) for t in (*queries, *docs))
        # The cosine of two (non-negative) bag-of-token embeddings: in [0, 1], like a cross-encoder's sigmoid.
        scores = [sum(a * b for a, b in zip(embed_text(q, dim), embed_text(d, dim), strict=True)) for q, d in pairs]
        self._account(used, 0)
        return scores, used

    async def _rerank(self, body: dict[str, Any], send: Send) -> int:
        """Serve POST /rerank, /v1/rerank, /v2/rerank: documents sorted by relevance to the query, top_n kept."""
        checked = self._check_scoring_model(body)
        if checked is None:
            await _send_json(send, 404, _NOT_FOUND)
            return 404
        model, cross = checked
        if "query" not in body:
            raise _validation_error("body.query", "missing", "Field required")
        if "documents" not in body:
            raise _validation_error("body.documents", "missing", "Field required")
        top_n = body.get("top_n", 0)
        if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
            raise _validation_error("body.top_n", "greater_than_equal", "Input should be greater than or equal to 0")
        documents = body["documents"] if isinstance(body["documents"], list) else [body["documents"]]
        scores, used = self._score_pairs(cross, [body["query"]], documents, body)
        await self._generation_delay([])
        results: list[dict[str, Any]] = [
            {"index": i, "document": {"text": doc, "multi_modal": None}, "relevance_score": score}
            for i, (doc, score) in enumerate(zip(documents, scores, strict=True))
        ]
        results.sort(key=lambda r: r["relevance_score"], reverse=True)
        if 0 < top_n < len(documents):
            results = results[:top_n]
        reported = used + self.config.usage_prompt_tokens_offset
        payload = {
            "id": "score-" + self._request_id(),
            "model": model,
            "usage": {"prompt_tokens": reported, "total_tokens": reported},
            "results": results,
        }
        await _send_json(send, 200, orjson.dumps(payload))
        return 200

    async def _score(self, body: dict[str, Any], send: Send) -> int:
        """Serve POST /score, /v1/score: `queries`/`documents` (or `items`, `data_1`/`data_2`, `text_1`/`text_2`)
        scored 1:1, 1:N or N:N, one score per pair in order."""
        checked = self._check_scoring_model(body)
        if checked is None:
            await _send_json(send, 404, _NOT_FOUND)
            return 404
        model, cross = checked
        pair = next(((a, b) for a, b in _SCORE_PAIRS if a in body and b in body), None)
        if pair is None:
            raise _validation_error("body", "missing", "Field required")
        first, second = ([body[k]] if not isinstance(body[k], list) else body[k] for k in pair)
        scores, used = self._score_pairs(cross, first, second, body)
        await self._generation_delay([])
        reported = used + self.config.usage_prompt_tokens_offset
        payload = {
            "id": "score-" + self._request_id(),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": [{"index": i, "object": "score", "score": score} for i, score in enumerate(scores)],
            "usage": _usage(reported, 0),
        }
        await _send_json(send, 200, orjson.dumps(payload))
        return 200

    def _request_id(self) -> str:
        """The request's X-Request-Id (vLLM's pooling ids reuse it), else a random id."""
        for name, value in self.stats.last_raw_headers:
            if name.lower() == b"x-request-id":
                return value.decode("latin-1")
        return _rid()

    # -- /tokenize -------------------------------------------------------------------------------

    def _check_any_model(self, body: dict[str, Any]) -> None:
        """Raise vLLM's 404 when /tokenize or /detokenize names a model that is not served."""
        model = body.get("model")
        cfg = self.config
        served = [*cfg.models, *cfg.embed_models, *cfg.rerank_models]
        if model is not None and model not in served:
            raise _HTTPError(
                404, f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.", param="model"
            )

    async def _tokenize(self, body: dict[str, Any], send: Send) -> int:
        """Serve POST /tokenize with either `messages` (chat) or `prompt`."""
        self._check_any_model(body)
        cfg = self.config
        messages = body.get("messages")
        if messages is not None:
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise _HTTPError(400, "`messages` must be a list of message objects.", param="messages")
            if body.get("continue_final_message") and body.get("add_generation_prompt"):
                raise _HTTPError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
            ids = chat_prompt_token_ids(messages)
            strs = [_TEMPLATE_TEXTS.get(t, t) for t in chat_prompt_tokens(messages)]
            if body.get("add_generation_prompt", True) is False or body.get("continue_final_message"):
                ids, strs = ids[: -len(_GENERATION_PROMPT)], strs[: -len(_GENERATION_PROMPT)]
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise _HTTPError(400, "Either `prompt` (string) or `messages` is required.", param="prompt")
            ids = token_ids(prompt)
            strs = TOKEN_RE.findall(prompt)
            texts = self._token_texts
            if len(texts) < _TOKEN_TEXTS_MAX:
                texts.update(zip(ids, strs, strict=True))
        await self._generation_delay([])
        token_strs = strs if body.get("return_token_strs") else None
        payload = {"count": len(ids), "max_model_len": cfg.max_model_len, "tokens": ids, "token_strs": token_strs}
        await _send_json(send, 200, orjson.dumps(payload))
        return 200

    async def _detokenize(self, body: dict[str, Any], send: Send) -> int:
        """Serve POST /detokenize: the ids /tokenize gave for a prompt back to text (unknown ids: nothing, as vLLM)."""
        self._check_any_model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise _HTTPError(
                400,
                "1 validation error:\n  {'type': 'list_type', 'loc': 'body.tokens', 'msg': 'Input should be a valid "
                "list of integers'}",
                "Bad Request",
                "body.tokens",
            )
        texts = self._token_texts
        prompt = " ".join(texts[t] for t in tokens if t in texts)
        await _send_json(send, 200, orjson.dumps({"prompt": prompt}))
        return 200

    # -- GET endpoints ---------------------------------------------------------------------------

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve GET /health (empty body, status `health_status`)."""
        status = self.config.health_status
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send(_EMPTY_BODY)

    async def _kv_event_sources(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve GET /kv_event_sources (where KV-cache events are published; {} without them)."""
        await _send_json(send, 200, orjson.dumps(kv_event_sources(self.config.kv_events_port)))

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve GET /version."""
        await _send_json(send, 200, _VLLM_VERSION)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve GET /v1/models."""
        cfg = self.config
        served = [*cfg.models, *cfg.embed_models, *cfg.rerank_models]
        ids = cfg.models_listed if cfg.models_listed is not None else served
        data = [
            {
                "id": mid,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": mid,
                "parent": None,
                "max_model_len": cfg.max_model_len,
                "permission": [_permission(self.created)],
            }
            for mid in ids
        ]
        await _send_json(send, 200, orjson.dumps({"object": "list", "data": data}))

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve GET /metrics in Prometheus text format (vLLM 0.32 metric names, HELP texts and types).

        The prefix-cache families are those the real vLLM 0.32 CPU build exposes with prefix caching
        on (checked on a live server): the two counters of tokens plus the by-source breakdowns,
        every sample labelled engine="0" and model_name; `vllm:cache_config_info` carries a subset of
        the real labels (block_size, enable_prefix_caching, engine, num_gpu_blocks). prometheus_client's
        *_created samples are left out, as for the other counters.
        """
        cfg = self.config
        stats = self.stats
        name = (cfg.models or cfg.embed_models or cfg.rerank_models or ["mock"])[0]
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        labels = '{engine="0",model_name="' + escaped + '"}'
        by = '{engine="0",model_name="' + escaped + '",source="'
        hits = float(stats.prefix_cache_hits_total)
        prompt = float(stats.prompt_tokens_total)
        enabled = self._prefix_cache_enabled()
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{labels} {float(max(stats.open_requests, 0))}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{labels} {float(cfg.num_requests_waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{labels} {float(cfg.kv_cache_usage_perc)}",
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{labels} {float(stats.prefix_cache_queries_total)}",
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{labels} {hits}",
            "# HELP vllm:external_prefix_cache_queries_total External prefix cache queries from KV connector "
            "cross-instance cache sharing, in terms of number of queried tokens.",
            "# TYPE vllm:external_prefix_cache_queries_total counter",
            f"vllm:external_prefix_cache_queries_total{labels} 0.0",
            "# HELP vllm:external_prefix_cache_hits_total External prefix cache hits from KV connector "
            "cross-instance cache sharing, in terms of number of cached tokens.",
            "# TYPE vllm:external_prefix_cache_hits_total counter",
            f"vllm:external_prefix_cache_hits_total{labels} 0.0",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{labels} {prompt}",
            "# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source.",
            "# TYPE vllm:prompt_tokens_by_source_total counter",
            f'vllm:prompt_tokens_by_source_total{by}local_compute"}} {prompt - hits}',
            f'vllm:prompt_tokens_by_source_total{by}local_cache_hit"}} {hits}',
            f'vllm:prompt_tokens_by_source_total{by}external_kv_transfer"}} 0.0',
            "# HELP vllm:prompt_tokens_cached_total Number of cached prompt tokens (local + external).",
            "# TYPE vllm:prompt_tokens_cached_total counter",
            f"vllm:prompt_tokens_cached_total{labels} {hits}",
            _CACHED_BY_SOURCE_HELP,
            "# TYPE vllm:prompt_tokens_cached_by_source_total counter",
            f'vllm:prompt_tokens_cached_by_source_total{by}device"}} {hits}',
            *(f'vllm:prompt_tokens_cached_by_source_total{by}{source}"}} 0.0' for source in _OTHER_CACHE_SOURCES),
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{labels} {float(stats.generation_tokens_total)}",
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
            "# TYPE vllm:cache_config_info gauge",
            f'vllm:cache_config_info{{block_size="{self.prefix_cache.block_size}",enable_prefix_caching="{enabled}",'
            f'engine="0",num_gpu_blocks="{self.prefix_cache.capacity}"}} 1.0',
        ]
        body = ("\n".join(lines) + "\n").encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [_METRICS_CT, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # -- /mock/* control endpoints ---------------------------------------------------------------

    async def _mock_stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve GET /mock/stats."""
        await _send_json(send, 200, orjson.dumps(self.stats.to_dict()))

    async def _mock_get_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve GET /mock/config."""
        await _send_json(send, 200, orjson.dumps(self.config.to_dict()))

    async def _mock_set_config(self, raw: bytes, send: Send) -> None:
        """Serve POST /mock/config: apply a JSON object of field changes, answer the new config."""
        try:
            changes = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError as exc:
            await _send_error(send, _HTTPError(400, f"Invalid JSON body: {exc}"))
            return
        if not isinstance(changes, dict):
            await _send_error(send, _HTTPError(400, "The request body must be a JSON object."))
            return
        try:
            self.config.update(changes)
        except KeyError as exc:
            await _send_error(send, _HTTPError(400, str(exc.args[0])))
            return
        await _send_json(send, 200, orjson.dumps(self.config.to_dict()))

    async def _mock_reset(self, raw: bytes, send: Send) -> None:
        """Serve POST /mock/reset: restore the construction-time config and zero the counters."""
        self.reset()
        await _send_json(send, 200, orjson.dumps(self.config.to_dict()))


# ---------------------------------------------------------------------------------------------
# Module-level helpers (kept out of the class for speed and reuse).
# ---------------------------------------------------------------------------------------------

_CACHED_BY_SOURCE_HELP = (
    "# HELP vllm:prompt_tokens_cached_by_source_total Prefix-cache hit tokens by the cache tier that supplied "
    "them: device (local HBM), host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
    "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits."
)
_OTHER_CACHE_SOURCES = ("host", "p2p", "disk", "external_unspecified")
_ROLE_TAIL = b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
_ROLE_EXTRA = b',"prompt_token_ids":null,"prompt_text":null}\n\n'  # after choices (and usage), as vLLM 0.32


def _chunk_prefix(rid: str, obj: str, created: int, model: str) -> bytes:
    """Build the constant start of every chunk of a stream, up to the choice index."""
    head = {"id": rid, "object": obj, "created": created, "model": model}
    # '{"id":...,"model":"m"}' -> 'data: {"id":...,"model":"m","choices":[{"index":'
    return b"data: " + orjson.dumps(head)[:-1] + b',"choices":[{"index":'


def _finish_on_last_token(plan: _Plan) -> bool:
    """Tell whether the finish_reason rides on the last token chunk (cut generation) or comes alone."""
    return bool(plan.pieces) and (plan.finish_reason == "length" or plan.stop_reason is not None)


def _finish_tail(plan: _Plan, chat: bool, content: bytes) -> bytes:
    """Build the end (after the choice index) of a chunk carrying the finish_reason."""
    reason = orjson.dumps(plan.finish_reason) + b',"stop_reason":' + orjson.dumps(plan.stop_reason)
    if chat:
        return (
            b',"delta":{"content":'
            + content
            + b'},"logprobs":null,"finish_reason":'
            + reason
            + b',"token_ids":null}]}\n\n'
        )
    return (
        b',"text":'
        + content
        + b',"logprobs":null,"finish_reason":'
        + reason
        + b',"prompt_token_ids":null,"token_ids":null}]}\n\n'
    )


def _validation_error(loc: str, kind: str, msg: str) -> _HTTPError:
    """vLLM's 400 for a request that fails its pydantic model: type "Bad Request", param the field's location."""
    return _HTTPError(
        400, f"1 validation error:\n  {{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}'}}", "Bad Request", loc
    )


def _json_error(exc: orjson.JSONDecodeError) -> _HTTPError:
    """vLLM's (FastAPI's) 400 for a body that is not JSON: type "Bad Request", param "body.<offset>"."""
    loc = f"body.{exc.pos}"
    message = (
        f"1 validation error:\n  {{'type': 'json_invalid', 'loc': '{loc}', 'msg': 'JSON decode error', "
        f"'input': '<dict of 0 items>', 'ctx': {{'error': {exc.msg!r}}}}}"
    )
    return _HTTPError(400, message, "Bad Request", loc)


def _die_message(tokens: int) -> str:
    """Describe a die_after_tokens abort."""
    return f"mock vLLM: die_after_tokens={tokens} reached, dropping the connection"


def _usage_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """Read stream_options: (include_usage, continuous_usage_stats); the latter needs the former, as in vLLM."""
    opts = body.get("stream_options")
    if not isinstance(opts, dict) or not opts.get("include_usage"):
        return False, False
    return True, bool(opts.get("continuous_usage_stats"))


# stream_options.continuous_usage_stats as the real vLLM 0.32 (CPU build) streams it (raw SSE captured):
#   data: {"id":"chatcmpl-..","object":"chat.completion.chunk","created":..,"model":"smollm2",
#     "choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],
#     "usage":{"prompt_tokens":37,"total_tokens":37,"completion_tokens":0,"completion_tokens_details":null},
#     "prompt_token_ids":null,"prompt_text":null}
#   data: {..,"choices":[{"index":0,"delta":{"content":"The"},"logprobs":null,"finish_reason":null,
#     "token_ids":null}],"usage":{"prompt_tokens":37,"total_tokens":38,"completion_tokens":1,
#     "completion_tokens_details":null}}
#   ... the finish chunk has usage too; then the usual final "choices":[],"usage":{...} chunk (no details
#   key there) and [DONE]. /v1/completions: same place, "usage":{"prompt_tokens":5,"total_tokens":6,
#   "completion_tokens":1} (no details key), prompt_tokens being the choice's own prompt in a batch.
# usage follows choices (the role chunk's prompt_token_ids/prompt_text nulls come after it); completion_tokens
# counts the tokens of THAT choice so far (n=2: 1,1,2,2,...);
# continuous_usage_stats without include_usage adds nothing.
def _with_usage(chunk: bytes, prompt_tokens: int, completion_tokens: int, chat: bool) -> bytes:
    """Append vLLM's continuous usage object to an SSE chunk (replaces its closing '}\\n\\n')."""
    usage = b'"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d' % (
        prompt_tokens,
        prompt_tokens + completion_tokens,
        completion_tokens,
    )
    details = b',"completion_tokens_details":null}' if chat else b"}"
    return chunk[:-3] + b"," + usage + details + b"}\n\n"


def _stream_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Build the usage object of a stream's final usage chunk (vLLM omits the details there)."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Build an OpenAI usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def _permission(created: int) -> dict[str, Any]:
    """One entry of a /v1/models model's `permission` list, as vLLM fills it."""
    return {
        "id": "modelperm-" + _rid(),
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


def _phrase(status: int) -> str:
    """Return the reason phrase of an HTTP status (or '')."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _deepcopy_fields(cfg: MockConfig) -> dict[str, Any]:
    """Copy a config's fields (lists copied) into a dict."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, list) else value
    return out


def _completion_prompts(prompt: Any) -> list[tuple[str, list[Any]]]:
    """Normalise a /v1/completions prompt into (text, tokens) pairs (token-id prompts have no text)."""
    if isinstance(prompt, str):
        return [(prompt, TOKEN_RE.findall(prompt))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [("", prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [(p, TOKEN_RE.findall(p)) for p in prompt]
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return [("", p) for p in prompt]
    raise _HTTPError(400, "`prompt` must be a string, a list of strings or token id list(s).", param="prompt")


_SCORE_PAIRS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


def _positive(body: dict[str, Any], name: str) -> int:
    """A non-negative integer parameter (0 when absent), or vLLM's 400."""
    value = body.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _HTTPError(400, f"{name} must be a non-negative integer")
    return value


def _embedding_inputs(value: Any) -> list[list[str] | list[int]]:
    """Normalise an embeddings `input` into token lists."""
    if isinstance(value, str):
        return [tokenize(value)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [tokenize(v) for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [list(value)]
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [list(v) for v in value]
    raise _HTTPError(400, "`input` must be a string, a list of strings or token id list(s).", param="input")


async def _read_body(receive: Receive) -> bytes:
    """Read the whole request body (raises _Disconnected if the client leaves first)."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _Disconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _wait_disconnect(receive: Receive) -> None:
    """Return when the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _send_json(send: Send, status: int, body: bytes) -> None:
    """Send a complete JSON response."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON_CT, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, err: _HTTPError) -> None:
    """Send a vLLM-shaped JSON error response."""
    await _send_json(send, err.status, _error_body(err.status, err.message, err.err_type, err.param))


async def _chunk(send: Send, data: bytes) -> None:
    """Send one SSE chunk as its own body message."""
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Answer ASGI lifespan startup/shutdown events."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
