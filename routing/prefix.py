"""Prefix-cache-aware routing: what a request's prompt starts with, and which backend has recently seen it.

A vLLM server answers a request whose prefix it holds in its KV cache many times faster (its prefill skips the
cached blocks). The router cannot see the engine's cache directly (see docs/kv-events.md), so it keeps, per
backend, an approximate index of the prompts it recently sent there:

- **Blocks.** The prompt as the engine will see it (for chat: the tools, then the messages in order, system
  prompt and earlier turns first; for completions: the prompt), serialised with orjson, is cut into blocks of
  `block_bytes` (256: ~64 tokens). Each block's key is a chained hash (the CRC-32 of everything up to the
  block's end, continued from the previous block's, in C, with the block's position above it), so a block only
  matches when everything before it matches too, like vLLM's own block hashes. A prompt shorter than one
  block has no blocks and costs nothing.
- **Index.** Per backend, an LRU set of block keys with a cap (`max_blocks`, default 16,384: about 4 MiB of
  prompt text, ~1M tokens; ~100 bytes of memory a block). Blocks are inserted deepest first, so a prompt's
  first block is its most recent and is evicted last: eviction shortens remembered prefixes from their ends,
  as an engine's LRU does.
- **Sharing.** With `REDIS_URL`, each process publishes the blocks it routed (batched, off the request path)
  and applies the others', so every process and replica holds the same index (`PrefixSync`). With the same
  messages it publishes its open requests per backend, so that the load guard and the least-loaded choice of a
  new prompt count every process's requests, not only their own (`PrefixSync.peer_in_flight`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 256
DEFAULT_MAX_BLOCKS = 16_384
MAX_PEERS = 1024  # other processes whose load is remembered (each message names its sender)


@dataclass(frozen=True, slots=True)
class PrefixConfig:
    """Tunables of prefix-aware routing (settings `ROUTER_PREFIX_*`)."""

    block_bytes: int = DEFAULT_BLOCK_BYTES
    max_blocks: int = DEFAULT_MAX_BLOCKS
    """Index cap per backend, in blocks."""
    min_match: float = 0.3
    """Below this share of the prompt's blocks matched, a request is treated as new (least loaded backend)."""
    balance_abs: int = 16
    balance_rel: float = 1.5
    """A backend is overloaded when its load exceeds the least loaded one's by more than `balance_abs` requests
    and by more than `balance_rel` times; overloaded backends are not chosen for their cache."""
    recent_s: float = 2.0
    """Precise mode (KV-cache events): how long the router's own placements count beside the engine's events."""


def prompt_bytes(endpoint: str, data: dict[str, Any]) -> bytes:
    """The prompt of a request as bytes, in the order the engine sees it (empty when there is none)."""
    try:
        if endpoint == "chat.completions":
            messages = orjson.dumps(data.get("messages"))
            tools = data.get("tools")
            return orjson.dumps(tools) + messages if tools else messages
        if endpoint == "completions":
            return orjson.dumps(data.get("prompt"))
        if endpoint == "responses":
            return orjson.dumps(data.get("instructions")) + orjson.dumps(data.get("input"))
    except orjson.JSONEncodeError:
        return b""
    return b""


def prefix_blocks(data: bytes, block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[int, ...]:
    """Chained keys of each full block of `data`: key i is the CRC-32 of blocks 0..i (continued from key i-1, in
    C) with i above it, so that only prefixes of the same length can collide (one chance in 2**32)."""
    view = memoryview(data)
    crc = 0
    keys = []
    crc32 = zlib.crc32
    for position, start in enumerate(range(0, len(data) - block_bytes + 1, block_bytes)):
        crc = crc32(view[start : start + block_bytes], crc)
        keys.append(position << 32 | crc)
    return tuple(keys)


class PrefixIndex:
    """Per backend, an LRU set of the prefix blocks recently routed there; bounded, see the module docstring."""

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        self.max_blocks = max(1, max_blocks)
        self._blocks: dict[str, OrderedDict[int, None]] = {}
        self._observed: dict[str, list[int]] = {}  # backend -> [matched blocks, queried blocks]

    def match(self, blocks: Sequence[int], backend: str) -> int:
        """How many leading blocks of the prompt the backend is believed to hold."""
        index = self._blocks.get(backend)
        if not index:
            return 0
        # Blocks are inserted deepest first, so held prefixes are (nearly) closed under shortening: search the
        # longest held one by bisection, confirming the bound with a linear step (eviction may leave gaps).
        low, high = 0, len(blocks)
        while low < high:
            middle = (low + high + 1) // 2
            if blocks[middle - 1] in index:
                low = middle
            else:
                high = middle - 1
        while low and blocks[low - 1] not in index:
            low -= 1
        return low

    def insert(self, backend: str, blocks: Sequence[int]) -> None:
        """Remember that the backend now holds these blocks (touching those it held)."""
        if not blocks:
            return
        index = self._blocks.get(backend)
        if index is None:
            index = self._blocks[backend] = OrderedDict()
        for key in reversed(blocks):
            if key in index:
                index.move_to_end(key)
            else:
                index[key] = None
        overflow = len(index) - self.max_blocks
        for _ in range(overflow):
            index.popitem(last=False)

    def observe(self, backend: str, matched: int, total: int) -> None:
        """Count one routing decision's expected hit (for the estimated hit ratio operators see)."""
        counts = self._observed.get(backend)
        if counts is None:
            counts = self._observed[backend] = [0, 0]
        counts[0] += matched
        counts[1] += total

    def drop(self, backend: str) -> None:
        """Forget a backend (drained, disabled, circuit open, removed): its cache is gone or unreachable."""
        self._blocks.pop(backend, None)

    def keep_only(self, backends: Iterable[str]) -> None:
        """Forget every backend not in `backends`."""
        keep = set(backends)
        for name in [n for n in self._blocks if n not in keep]:
            del self._blocks[name]
        for name in [n for n in self._observed if n not in keep]:
            del self._observed[name]

    def size(self, backend: str) -> int:
        """Blocks remembered for a backend."""
        index = self._blocks.get(backend)
        return len(index) if index is not None else 0

    def backends(self) -> list[str]:
        """Backends with an index."""
        return list(self._blocks)

    def hit_ratio(self, backend: str) -> float | None:
        """Share of the prompt blocks routed to a backend that routing expected it to hold (None: none routed)."""
        counts = self._observed.get(backend)
        return counts[0] / counts[1] if counts and counts[1] else None


class RecentPlacements:
    """The blocks of prompts placed in the last `window_s` seconds, per backend (precise mode's short memory).

    An engine publishes a prompt's blocks only after computing them (its prefill), so for that long the KV-cache
    events show nothing of a prompt just sent; a second request sharing it would look new and could be split off
    to another backend. What the router itself placed a moment ago covers that gap; after `window_s` only the
    engine's events count. Bounded by `max_entries` (oldest dropped first) as well as by time.
    """

    def __init__(
        self, window_s: float = 2.0, *, max_entries: int = 16_384, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self.max_entries = max(1, max_entries)
        self._clock = clock
        self._placed: OrderedDict[tuple[str, int], float] = OrderedDict()  # (backend, block key) -> placed at

    def __len__(self) -> int:
        return len(self._placed)

    def add(self, backend: str, blocks: Sequence[int]) -> None:
        """Note that these blocks were just sent to the backend."""
        now = self._clock()
        placed = self._placed
        for key in blocks:
            entry = (backend, key)
            placed[entry] = now
            placed.move_to_end(entry)
        horizon = now - self.window_s
        while placed and (len(placed) > self.max_entries or next(iter(placed.values())) < horizon):
            placed.popitem(last=False)

    def match(self, blocks: Sequence[int], backend: str) -> int:
        """How many leading blocks were sent to the backend within the window."""
        horizon = self._clock() - self.window_s
        placed = self._placed
        matched = 0
        for key in blocks:
            at = placed.get((backend, key))
            if at is None or at < horizon:
                break
            matched += 1
        return matched

    def drop(self, backend: str) -> None:
        """Forget a backend's placements."""
        for entry in [e for e in self._placed if e[0] == backend]:
            del self._placed[entry]


class PrefixSync:
    """Shares prefix-index inserts, and each process's open requests per backend, through Redis pub/sub.

    `publish()` only appends to a buffer (the request path pays a list append); a background task sends the
    buffer every `interval_s` as one message, and a subscriber applies other processes' inserts to the local
    indexes. Losing a message (Redis down, a restart) only costs cache hits, never a request.

    Load: the same message carries this process's open requests per backend (`load_source`, the dispatcher's
    counters) whenever they changed, and at least every `heartbeat_s`. `peer_in_flight` is the sum of the other
    processes' latest counts, each dropped `stale_s` after its last message (a process that died stops counting),
    so that the load guard sees a prefix made hot by every worker at once at its whole load. It does not make
    new prompts that reach two processes in the same instant agree (measured: docs/routing.md).
    """

    CHANNEL = "llm:prefix"

    def __init__(
        self,
        redis_url: str,
        *,
        process_id: str,
        interval_s: float = 0.05,
        max_buffer: int = 10_000,
        heartbeat_s: float = 0.5,
        stale_s: float = 2.0,
    ) -> None:
        self.redis_url = redis_url
        self.process_id = process_id
        self.interval_s = interval_s
        self.max_buffer = max_buffer
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self._buffer: list[tuple[str, str, tuple[int, ...]]] = []
        self._indexes: dict[str, PrefixIndex] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.received = 0
        self.sent = 0
        self.load_source: Callable[[], dict[str, int]] | None = None
        """This process's open requests per backend name (set by the dispatcher)."""
        self._peers: dict[str, tuple[float, dict[str, int]]] = {}
        self.peer_in_flight: dict[str, int] = {}
        """The other processes' open requests per backend name, summed (read on the request path)."""

    def attach(self, pool: str, index: PrefixIndex) -> None:
        """Apply remote inserts for `pool` to this index (the latest attached one per pool)."""
        self._indexes[pool] = index

    def publish(self, pool: str, backend: str, blocks: tuple[int, ...]) -> None:
        """Queue one routing decision for the other processes (dropped when the buffer is full)."""
        if blocks and len(self._buffer) < self.max_buffer:
            self._buffer.append((pool, backend, blocks))

    def ensure_running(self) -> None:
        """Start the sender and the subscriber on the running loop, once."""
        if self._tasks and not all(t.done() for t in self._tasks):
            return
        self._tasks = [asyncio.ensure_future(self._send_loop()), asyncio.ensure_future(self._receive_loop())]

    async def aclose(self) -> None:
        """Stop the background tasks."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def _send_loop(self) -> None:
        import redis.asyncio as redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        last_load: dict[str, int] | None = None
        last_sent = 0.0
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                now = time.monotonic()
                self.expire(now)
                load = self._own_load()
                load_due = load is not None and (load != last_load or now - last_sent >= self.heartbeat_s)
                if not self._buffer and not load_due:
                    continue
                batch, self._buffer = self._buffer, []
                message: dict[str, Any] = {"from": self.process_id, "inserts": batch}
                if load is not None:
                    message["load"] = load
                try:
                    await client.publish(self.CHANNEL, orjson.dumps(message))
                    self.sent += len(batch)
                    last_load, last_sent = load, now
                except Exception as exc:  # Redis down: the hint is lost, routing goes on
                    logger.debug("prefix sync: publish failed (%s)", type(exc).__name__)
        finally:
            await client.aclose()

    def _own_load(self) -> dict[str, int] | None:
        """This process's open requests per backend (a copy), or None when nothing provides them."""
        if self.load_source is None:
            return None
        return {name: count for name, count in self.load_source().items() if count > 0}

    def expire(self, now: float) -> None:
        """Forget the load of processes not heard from for `stale_s`."""
        stale = [pid for pid, (heard, _) in self._peers.items() if now - heard > self.stale_s]
        if stale:
            for pid in stale:
                del self._peers[pid]
            self._sum_peers()

    def _sum_peers(self) -> None:
        total: dict[str, int] = {}
        for _, load in self._peers.values():
            for name, count in load.items():
                total[name] = total.get(name, 0) + count
        self.peer_in_flight = total

    async def _receive_loop(self) -> None:
        import redis.asyncio as redis

        while True:
            client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.apply(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("prefix sync: subscription lost (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def apply(self, payload: bytes) -> None:
        """Apply one message of another process (ignoring our own and anything malformed)."""
        try:
            message = orjson.loads(payload)
            sender = message.get("from")
            if sender == self.process_id:
                return
            load = message.get("load")
            known = sender in self._peers or len(self._peers) < MAX_PEERS
            if isinstance(load, dict) and isinstance(sender, str) and known:
                counts = {str(k): int(v) for k, v in load.items() if isinstance(v, int) and 0 < v < 1_000_000}
                self._peers[sender] = (time.monotonic(), counts)
                self._sum_peers()
            for pool, backend, blocks in message["inserts"]:
                index = self._indexes.get(pool)
                if index is not None and isinstance(backend, str):
                    index.insert(backend, [int(b) for b in blocks])
                    self.received += 1
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            logger.debug("prefix sync: malformed message ignored")
