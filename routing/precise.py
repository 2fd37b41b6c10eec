"""Precise prefix mode: `prefix_aware` scored by the blocks vLLM's engines report holding (their KV-cache events).

Opt-in (`ROUTER_KV_EVENTS`). One `PreciseRouting` per web process, owned by the dispatcher:

- **Discovery.** A background task asks every backend of a `prefix_aware` pool (not disabled) for
  `GET /kv_event_sources` at start, on every registry change and every `discovery_interval_s`, turns the answer
  into an endpoint (`routing.kv_events.endpoint_from_sources`: vLLM must bind, `tcp://*:PORT`) and keeps the
  `KvEventsHub` subscribed to exactly those (`hub.sync`). A backend that answers anything but a publisher is
  not subscribed; one that cannot be reached keeps its subscription (the socket's disconnect already emptied
  its index). Nothing here is on the request path.
- **Token ids.** vLLM keys its blocks by token ids after the chat template, which the router does not have. Per
  request, only for a `prefix_aware` pool with at least one candidate whose index is live (it has learnt the
  engine's block size), the dispatcher asks one such candidate for `POST /tokenize` with the request's
  messages (or prompt) and the template options, bounded by `tokenize_timeout_s`. A failure or timeout falls
  back to the approximate mode for that request and rests that backend's tokenizer for `retry_after_s`. A
  completion whose prompt is already token ids needs no call.
- **Scores.** `cached_blocks` turns the ids into `block_keys` at each candidate's block size and asks the hub
  how many leading blocks each engine holds; `routing.strategies.PrefixAware` does the rest.

With the setting off nothing of this exists, and for other strategies nothing of this runs. See docs/kv-events.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson

from backends.models import RoutingStrategy
from backends.snapshot import BackendSnap, RegistrySnapshot
from routing.kv_events import BackendBlockIndex, IndexStats, KvEventsHub, block_keys, endpoint_from_sources
from routing.upstream import Timeouts, UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

PREFIX_AWARE = RoutingStrategy.PREFIX_AWARE.value

# Fields of a chat completion request that change the tokens the chat template produces (vLLM's
# TokenizeChatRequest accepts the same names).
CHAT_TEMPLATE_FIELDS = (
    "tools",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "mm_processor_kwargs",
)
MAX_TOKENIZE_ANSWER_BYTES = 8 * 1024 * 1024


class BlockSource(Protocol):
    """What precise mode reads and drives: `routing.kv_events.KvEventsHub` (tests pass a fake)."""

    def sync(self, endpoints: Mapping[str, str | None]) -> None: ...

    def index(self, name: str) -> BackendBlockIndex | None: ...

    def stats(self) -> dict[str, IndexStats]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PreciseConfig:
    """Tunables of precise mode (settings `ROUTER_KV_EVENTS_*`)."""

    max_blocks: int = 65_536
    """Blocks remembered per backend (oldest forgotten first)."""
    tokenize_timeout_s: float = 0.1
    discovery_interval_s: float = 30.0
    discovery_timeout_s: float = 2.0
    retry_after_s: float = 10.0
    """After a failed /tokenize, how long that backend's tokenizer is left alone."""


class PreciseRouting:
    """Discovery, subscriptions and per-request token blocks of precise mode; see the module docstring."""

    def __init__(self, config: PreciseConfig | None = None, *, hub: BlockSource | None = None) -> None:
        self.config = config or PreciseConfig()
        self.hub: BlockSource = hub if hub is not None else KvEventsHub(max_blocks=self.config.max_blocks)
        self.endpoints: dict[str, str | None] = {}
        self._targets: list[BackendSnap] = []
        self._registry: RegistrySnapshot | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._resting: dict[str, float] = {}  # backend -> monotonic time its tokenizer may be asked again
        self.tokenized = 0
        self.tokenize_failures = 0

    # --- discovery (background) ---------------------------------------------------------------------------------

    def observe(self, registry: RegistrySnapshot, client: Callable[[], httpx.AsyncClient]) -> None:
        """Follow the registry: (re)start discovery on this loop, and run it again at once when the registry
        changed. An identity check per request otherwise."""
        task = self._task
        if registry is self._registry and task is not None and not task.done():
            return
        self._registry = registry
        self._targets = [
            b
            for pool in registry.pools.values()
            if pool.enabled and pool.strategy == PREFIX_AWARE
            for b in pool.backends
            if b.state != "disabled"
        ]
        if task is None or task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._discover(client), name="kv-events-discovery")
        elif self._wake is not None:
            self._wake.set()

    async def _discover(self, client: Callable[[], httpx.AsyncClient]) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            wake.clear()
            try:
                await self.discover_once(self._targets, client())
            except Exception:  # never let discovery die
                logger.exception("kv events: discovery failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.config.discovery_interval_s)

    async def discover_once(self, backends: Sequence[BackendSnap], client: httpx.AsyncClient) -> None:
        """Ask each backend where it publishes, and subscribe to exactly those (others are unsubscribed)."""

        async def one(backend: BackendSnap) -> None:
            headers = {"authorization": f"Bearer {backend.api_key}"} if backend.api_key else None
            try:
                response = await client.get(
                    f"{backend.base_url}/kv_event_sources", headers=headers, timeout=self.config.discovery_timeout_s
                )
            except httpx.HTTPError:
                return  # unreachable: keep what was known (a dead engine's index is emptied by its disconnect)
            endpoint = None
            if response.status_code == 200:
                with contextlib.suppress(ValueError):
                    endpoint = endpoint_from_sources(backend.base_url, response.json())
            if endpoint != self.endpoints.get(backend.name):
                logger.info("kv events: backend %s %s", backend.name, "publishes" if endpoint else "publishes nothing")
            self.endpoints[backend.name] = endpoint

        names = {b.name for b in backends}
        for gone in [n for n in self.endpoints if n not in names]:
            del self.endpoints[gone]
        await asyncio.gather(*(one(b) for b in backends))
        self.hub.sync(dict(self.endpoints))

    # --- the request path ---------------------------------------------------------------------------------------

    def live(self, name: str) -> bool:
        """Whether the backend's engine is subscribed and has published (its block size is known)."""
        index = self.hub.index(name)
        return index is not None and index.block_size is not None

    def tokenizer(self, backends: Iterable[BackendSnap], in_flight: Mapping[str, int]) -> BackendSnap | None:
        """The backend to ask for token ids: a live one not resting after a failure, the least busy."""
        now = time.monotonic()
        best: BackendSnap | None = None
        for b in backends:
            if not self.live(b.name) or self._resting.get(b.name, 0.0) > now:
                continue
            if best is None or in_flight.get(b.name, 0) < in_flight.get(best.name, 0):
                best = b
        return best

    async def token_ids(
        self,
        endpoint: str,
        data: Mapping[str, Any] | None,
        *,
        backend: BackendSnap,
        upstream: UpstreamClient,
        url: str,
        headers: Mapping[str, str],
    ) -> Sequence[int] | None:
        """The request's prompt token ids as the engine sees them, or None (no prompt to score, or a failure)."""
        if data is None:
            return None
        if endpoint == "completions":
            prompt = data.get("prompt")
            if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
                return prompt  # already token ids
            if not isinstance(prompt, str):
                return None  # several prompts, or token id lists: not scored
            body: dict[str, Any] = {"model": data.get("model"), "prompt": prompt}
            if "add_special_tokens" in data:
                body["add_special_tokens"] = data["add_special_tokens"]
        elif endpoint == "chat.completions":
            body = {"model": data.get("model"), "messages": data.get("messages")}
            for name in CHAT_TEMPLATE_FIELDS:
                if data.get(name) is not None:
                    body[name] = data[name]
        else:
            return None
        timeout = self.config.tokenize_timeout_s
        try:
            async with asyncio.timeout(timeout):
                response = await upstream.send(
                    "POST",
                    f"{url}/tokenize",
                    headers=headers,
                    content=orjson.dumps(body),
                    timeouts=Timeouts(connect=timeout, read=timeout, write=timeout, pool=timeout),
                    stream=False,
                )
            try:
                ids = _token_list(response.status_code, response.content)
            finally:
                await response.aclose()
        except (TimeoutError, UpstreamError, ValueError) as exc:  # orjson.JSONEncodeError is a ValueError
            ids = None
            reason = type(exc).__name__
        else:
            reason = "an unusable answer"
        if ids is None:
            self.tokenize_failures += 1
            self._resting[backend.name] = time.monotonic() + self.config.retry_after_s
            logger.info("kv events: /tokenize on %s failed (%s); approximate mode for now", backend.name, reason)
            return None
        self.tokenized += 1
        return ids

    def cached_blocks(self, candidates: Sequence[BackendSnap], token_ids: Sequence[int]) -> dict[str, tuple[int, int]]:
        """Per live candidate: (leading blocks of the request its engine holds, full blocks of the request)."""
        out: dict[str, tuple[int, int]] = {}
        keys_by_size: dict[int, list[int]] = {}
        for b in candidates:
            index = self.hub.index(b.name)
            size = index.block_size if index is not None else None
            if index is None or not size:
                continue
            keys = keys_by_size.get(size)
            if keys is None:
                keys = keys_by_size[size] = block_keys(token_ids, size)
            if keys:
                out[b.name] = (index.matched_blocks(keys), len(keys))
        return out

    # --- visibility and shutdown -------------------------------------------------------------------------------

    def view(self) -> dict[str, dict[str, int | bool]]:
        """Per subscribed backend: blocks its engine is known to hold, and whether its events are live."""
        return {
            name: {"kv_events_blocks": stats.blocks, "kv_events_live": stats.block_size is not None}
            for name, stats in self.hub.stats().items()
        }

    async def aclose(self) -> None:
        """Stop discovery and every subscription."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.hub.aclose()


def precise_routing_from_settings() -> PreciseRouting:
    """Precise mode as the settings `ROUTER_KV_EVENTS_*` configure it."""
    from django.conf import settings

    return PreciseRouting(
        PreciseConfig(
            max_blocks=settings.ROUTER_KV_EVENTS_MAX_BLOCKS,
            tokenize_timeout_s=settings.ROUTER_KV_EVENTS_TOKENIZE_TIMEOUT_MS / 1000.0,
            discovery_interval_s=settings.ROUTER_KV_EVENTS_DISCOVERY_S,
        )
    )


def _token_list(status: int, content: bytes) -> list[int] | None:
    """The `tokens` of a 200 answer of vLLM's /tokenize, or None."""
    if status != 200 or len(content) > MAX_TOKENIZE_ANSWER_BYTES:
        return None
    try:
        tokens = orjson.loads(content).get("tokens")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        return None
    return tokens
