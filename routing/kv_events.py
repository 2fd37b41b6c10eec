"""Precise prefix-cache view: the KV-cache events vLLM publishes over ZeroMQ, one subscriber task per backend.

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557"}'`,
prefix caching on) publishes, after each engine step that changed its prefix cache, a multipart message
`[topic, seq (8 bytes, big-endian), msgpack(KVEventBatch)]` on a ZMQ PUB socket. The batch is an array
`[ts, events, data_parallel_rank]`; each event a map tagged by `type`:

- `BlockStored`: `block_hashes` (one per full block), `parent_block_hash` (None for the first block of a
  prompt), `token_ids` (all the blocks' tokens), `block_size`, `medium`, `lora_name`, `extra_keys`,
  `group_idx`, `kv_cache_spec_kind`, ...
- `BlockRemoved`: `block_hashes`, `medium`, `group_idx` (evicted blocks);
- `AllBlocksCleared` (prefix cache reset).

vLLM's own block hash (sha256 over pickled Python objects by default, seeded) is not something the router can
or should recompute, so each stored block gets a **router key**: a chained blake2b over the parent block's
router key and the block's token ids (`block_keys`). The same function applied to a request's token ids gives
the keys to look up, so a strategy scores a backend by `BackendBlockIndex.matched_blocks(keys)`: how many of
the request's leading blocks that backend really holds. vLLM's hashes are kept only to resolve parents and
removals.

Everything here runs in background tasks; the request path only reads an index (a dict lookup per block under
an uncontended lock). Sizes are bounded: ZMQ message size and receive queue, blocks per backend (oldest
forgotten first, which can only make the router miss a hit, never invent one).
See docs/kv-events.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

logger = logging.getLogger(__name__)

ROOT_KEY = 0
"""Router key of the (empty) parent of a prompt's first block."""

# Media the engine's own KV cache is published under. vLLM labels its device cache "GPU" even in the CPU build
# (BlockPool.medium); offloading connectors publish "CPU" / "STORAGE" tiers, which this index ignores.
PRIMARY_MEDIA = frozenset({None, "GPU"})
# Only full-attention groups decide a prefix hit for the models this platform serves.
TRACKED_KINDS = frozenset({None, "full_attention"})

BlockHash = int | bytes  # vLLM sends 64-bit ints (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, default) or bytes


# ----------------------------------------------------------------------------------------- wire format
# Mirrors vllm/distributed/kv_events.py (vLLM 0.32.0) for decoding only. Unknown map fields are ignored and
# unknown event types are skipped one by one, so a newer vLLM adding fields or events does not break the feed.


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    """Full blocks newly added to the engine's prefix cache."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    """Blocks evicted from the engine's prefix cache."""

    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True):
    """The engine's prefix cache was reset."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    """One engine step's events; events are decoded one by one (see `decode_batch`)."""

    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_BATCH_DECODER = msgspec.msgpack.Decoder(KVEventBatch)
_EVENT_DECODER = msgspec.msgpack.Decoder(KVCacheEvent)


def decode_batch(payload: bytes) -> tuple[list[KVCacheEvent], int]:
    """Decode one payload into its known events and the number of events skipped (unknown or malformed).

    Raises msgspec.DecodeError (or ValidationError) when the batch itself is not a KVEventBatch.
    """
    batch = _BATCH_DECODER.decode(payload)
    events: list[KVCacheEvent] = []
    skipped = 0
    for raw in batch.events:
        try:
            events.append(_EVENT_DECODER.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError):
            skipped += 1
    return events, skipped


# ------------------------------------------------------------------------------------------ router keys


def _extra_bytes(extra: Any) -> bytes:
    return b"" if extra is None else b"x" + repr(extra).encode()


def block_keys(
    token_ids: Sequence[int],
    block_size: int,
    *,
    parent: int = ROOT_KEY,
    lora_name: str | None = None,
    extra_keys: Sequence[Any] | None = None,
) -> list[int]:
    """Router keys of the full blocks of `token_ids` (a partial last block has none), chained from `parent`.

    Key i = blake2b-64(key i-1, lora name, block i's extra keys, block i's token ids): equal keys mean equal
    token prefixes, whatever hash algorithm or seed the engine uses. A request with 2,048 tokens in 128-token
    blocks costs 16 hashes (a few microseconds).
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    salt = b"" if lora_name is None else b"lora:" + lora_name.encode()
    n_blocks = len(token_ids) // block_size
    tokens = memoryview(array("q", token_ids[: n_blocks * block_size]).tobytes())
    stride = block_size * 8
    keys: list[int] = []
    for i in range(n_blocks):
        digest = hashlib.blake2b(digest_size=8)
        digest.update(parent.to_bytes(8, "big"))
        digest.update(salt)
        digest.update(b"\x00")
        digest.update(_extra_bytes(extra_keys[i] if extra_keys and i < len(extra_keys) else None))
        digest.update(b"\x00")
        digest.update(tokens[i * stride : (i + 1) * stride])
        parent = int.from_bytes(digest.digest(), "big")
        keys.append(parent)
    return keys


# --------------------------------------------------------------------------------------- per-backend index


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Counters of one backend's index (for admin / metrics / tests)."""

    blocks: int
    block_size: int | None
    stored: int
    removed: int
    cleared: int
    orphans: int
    skipped: int
    forgotten: int
    gaps: int
    restarts: int
    disconnects: int
    last_seq: int | None
    last_event_at: float | None


class BackendBlockIndex:
    """The blocks one backend's engine holds, as router keys; written by its subscriber, read by strategies.

    Thread-safe (one lock; every operation is O(blocks in the event or request)). Bounded by `max_blocks`:
    past it the oldest stored blocks are forgotten.
    """

    def __init__(self, *, max_blocks: int) -> None:
        if max_blocks <= 0:
            raise ValueError("max_blocks must be positive")
        self._max_blocks = max_blocks
        self._lock = threading.Lock()
        self._by_hash: OrderedDict[tuple[int, BlockHash], int] = OrderedDict()  # (group, vLLM hash) -> key
        self._keys: dict[int, int] = {}  # router key -> number of (group, hash) entries holding it
        self._block_size: int | None = None
        self._counts = dict.fromkeys(
            ("stored", "removed", "cleared", "orphans", "skipped", "forgotten", "gaps", "restarts", "disconnects"),
            0,
        )
        self._last_seq: int | None = None
        self._last_event_at: float | None = None

    @property
    def block_size(self) -> int | None:
        """The engine's block size, learned from its first BlockStored (None before)."""
        return self._block_size

    def __len__(self) -> int:
        return len(self._by_hash)

    def matched_blocks(self, keys: Sequence[int]) -> int:
        """How many of `keys` (a request's block keys, in order) are cached, counting from the first."""
        with self._lock:
            held = self._keys
            matched = 0
            for key in keys:
                if key not in held:
                    break
                matched += 1
            return matched

    def contains(self, key: int) -> bool:
        """Whether the block with this router key is cached."""
        with self._lock:
            return key in self._keys

    def clear(self) -> None:
        """Forget everything (engine restarted, events lost, or backend gone)."""
        with self._lock:
            self._clear_locked()

    def disconnected(self) -> None:
        """The connection to the publisher dropped (engine stopped or crashed, or the network): forget everything
        and accept any sequence number next."""
        with self._lock:
            self._counts["disconnects"] += 1
            self._last_seq = None
            self._clear_locked()

    def observe_seq(self, seq: int) -> None:
        """Check a batch's sequence number: a restart (seq went back) or a gap (batches lost) clears the index.

        A cleared index can only make the router miss hits until new events arrive; keeping it could make the
        router count blocks the engine no longer has.
        """
        with self._lock:
            last = self._last_seq
            self._last_seq = seq
            if last is None or seq == last + 1:
                return
            if seq <= last:
                self._counts["restarts"] += 1
            else:
                self._counts["gaps"] += 1
            self._clear_locked()

    def apply(self, events: Sequence[KVCacheEvent], skipped: int = 0) -> None:
        """Apply one batch's events, in order."""
        with self._lock:
            self._counts["skipped"] += skipped
            self._last_event_at = time.monotonic()
            for event in events:
                if isinstance(event, BlockStored):
                    self._store_locked(event)
                elif isinstance(event, BlockRemoved):
                    self._remove_locked(event)
                else:
                    self._counts["cleared"] += 1
                    self._clear_locked()

    def stats(self) -> IndexStats:
        """A snapshot of the counters."""
        with self._lock:
            return IndexStats(
                blocks=len(self._by_hash),
                block_size=self._block_size,
                last_seq=self._last_seq,
                last_event_at=self._last_event_at,
                **self._counts,
            )

    # -- internals (lock held) --

    def _clear_locked(self) -> None:
        self._by_hash.clear()
        self._keys.clear()

    def _store_locked(self, event: BlockStored) -> None:
        if event.medium not in PRIMARY_MEDIA or event.kv_cache_spec_kind not in TRACKED_KINDS:
            self._counts["skipped"] += 1
            return
        n_blocks = len(event.block_hashes)
        if event.block_size <= 0 or len(event.token_ids) != n_blocks * event.block_size:
            # Partial-block entries (prefix_match_unit finer than the block) are not tracked.
            self._counts["skipped"] += 1
            return
        group = event.group_idx or 0
        if event.parent_block_hash is None:
            parent = ROOT_KEY
        else:
            known = self._by_hash.get((group, event.parent_block_hash))
            if known is None:
                # The parent was stored before this subscriber listened (or was forgotten): the prefix these
                # blocks extend is unknown, so they cannot be keyed.
                self._counts["orphans"] += n_blocks
                return
            parent = known
        self._block_size = event.block_size
        keys = block_keys(
            event.token_ids,
            event.block_size,
            parent=parent,
            lora_name=event.lora_name,
            extra_keys=event.extra_keys,
        )
        for vllm_hash, key in zip(event.block_hashes, keys, strict=True):
            entry = (group, vllm_hash)
            if entry in self._by_hash:
                self._release_locked(self._by_hash.pop(entry))
            self._by_hash[entry] = key
            self._keys[key] = self._keys.get(key, 0) + 1
            self._counts["stored"] += 1
        while len(self._by_hash) > self._max_blocks:
            _, key = self._by_hash.popitem(last=False)
            self._release_locked(key)
            self._counts["forgotten"] += 1

    def _remove_locked(self, event: BlockRemoved) -> None:
        if event.medium not in PRIMARY_MEDIA:
            return
        group = event.group_idx or 0
        for vllm_hash in event.block_hashes:
            key = self._by_hash.pop((group, vllm_hash), None)
            if key is not None:
                self._release_locked(key)
                self._counts["removed"] += 1

    def _release_locked(self, key: int) -> None:
        left = self._keys.get(key, 0) - 1
        if left > 0:
            self._keys[key] = left
        else:
            self._keys.pop(key, None)


# ------------------------------------------------------------------------------------------- subscriber


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    """Bounds of one subscription (all in the unit named)."""

    max_message_bytes: int = 16 * 1024 * 1024  # larger messages make ZMQ drop the connection
    receive_queue: int = 1_000  # ZMQ receive high-water mark, in messages
    poll_ms: int = 1_000
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0


async def subscribe(
    *,
    name: str,
    endpoint: str,
    index: BackendBlockIndex,
    topic: bytes = b"",
    config: SubscriberConfig | None = None,
    context: zmq.asyncio.Context | None = None,
) -> None:
    """Feed `index` from the PUB socket at `endpoint` until cancelled. Never raises except CancelledError.

    ZMQ reconnects a dropped TCP connection by itself; a drop (seen on the socket's monitor) clears the index,
    since a stopped engine's cache is gone, and a restart also shows as sequence numbers going back. A broken
    socket is closed and re-created after a growing pause.
    """
    cfg = config or SubscriberConfig()
    ctx = context or zmq.asyncio.Context.instance()
    pause = cfg.reconnect_min_s
    while True:
        sock = ctx.socket(zmq.SUB)
        monitor: zmq.asyncio.Socket | None = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
            sock.setsockopt(zmq.RCVHWM, cfg.receive_queue)
            sock.setsockopt(zmq.RECONNECT_IVL, int(cfg.reconnect_min_s * 1000))
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(cfg.reconnect_max_s * 1000))
            sock.setsockopt(zmq.SUBSCRIBE, topic)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            poller = zmq.asyncio.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            sock.connect(endpoint)
            logger.info("kv events: %s subscribed", name)
            while True:
                ready = dict(await poller.poll(cfg.poll_ms))
                if monitor in ready:
                    event = parse_monitor_message(await monitor.recv_multipart())
                    if event["event"] == zmq.EVENT_DISCONNECTED:
                        logger.info("kv events: %s disconnected; its blocks are forgotten", name)
                        index.disconnected()
                if sock in ready:
                    handle_message(index, await sock.recv_multipart(), name=name)
                    pause = cfg.reconnect_min_s
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken socket must not end the task
            logger.warning(
                "kv events: %s subscription failed (%s); retrying in %.1f s", name, type(exc).__name__, pause
            )
        finally:
            if monitor is not None:
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()
                monitor.close(linger=0)
            sock.close(linger=0)
        await asyncio.sleep(pause)
        pause = min(pause * 2, cfg.reconnect_max_s)


def handle_message(index: BackendBlockIndex, frames: Sequence[bytes], *, name: str = "") -> bool:
    """Apply one `[topic, seq, payload]` message to `index`; False (and nothing applied) when malformed."""
    if len(frames) != 3 or len(frames[1]) != 8:
        logger.debug("kv events: %s sent a message of unexpected shape", name)
        return False
    try:
        events, skipped = decode_batch(frames[2])
    except (msgspec.DecodeError, msgspec.ValidationError):
        logger.debug("kv events: %s sent an undecodable batch", name)
        return False
    index.observe_seq(int.from_bytes(frames[1], "big"))
    index.apply(events, skipped)
    return True


class KvEventsHub:
    """One subscriber task and one index per backend, kept in line with the registry by `sync`.

    Create and use it inside the event loop that runs the tasks (`sync` starts them there).
    """

    def __init__(
        self,
        *,
        max_blocks: int,
        config: SubscriberConfig | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self._max_blocks = max_blocks
        self._config = config or SubscriberConfig()
        self._context = context
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._indexes: dict[str, BackendBlockIndex] = {}

    def sync(self, endpoints: Mapping[str, str | None]) -> None:
        """Subscribe to each backend's endpoint; stop (and forget) backends gone or whose endpoint changed."""
        for name in list(self._tasks):
            subscribed, running = self._tasks[name]
            if endpoints.get(name) != subscribed:
                running.cancel()
                del self._tasks[name]
                self._indexes.pop(name, None)
        for name, endpoint in endpoints.items():
            if not endpoint or name in self._tasks:
                continue
            index = BackendBlockIndex(max_blocks=self._max_blocks)
            self._indexes[name] = index
            task = asyncio.get_running_loop().create_task(
                subscribe(name=name, endpoint=endpoint, index=index, config=self._config, context=self._context),
                name=f"kv-events:{name}",
            )
            self._tasks[name] = (endpoint, task)

    def index(self, name: str) -> BackendBlockIndex | None:
        """The backend's index, or None when it has no subscription."""
        return self._indexes.get(name)

    def matched_blocks(self, name: str, keys: Sequence[int]) -> int | None:
        """Leading blocks of `keys` cached on backend `name`; None when it publishes no events."""
        index = self._indexes.get(name)
        return None if index is None else index.matched_blocks(keys)

    def stats(self) -> dict[str, IndexStats]:
        """Each subscribed backend's counters."""
        return {name: index.stats() for name, index in self._indexes.items()}

    async def aclose(self) -> None:
        """Cancel every subscriber task and wait for them."""
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        self._indexes.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def endpoint_from_sources(backend_url: str, sources: Any) -> str | None:
    """The endpoint to subscribe to, from the JSON of a vLLM server's `GET /kv_event_sources`.

    vLLM answers `{"<dp rank>": {"enable_kv_cache_events": true, "publisher": "zmq", "endpoint":
    "tcp://*:5557", ...}}`. A wildcard host (vLLM bound the socket) is replaced by the backend's own host. An
    endpoint naming a host means vLLM *connects* its PUB socket there (ZmqEventPublisher._is_bind_endpoint):
    nothing to subscribe to, so None. Only data-parallel rank 0 is used.
    """
    if not isinstance(sources, Mapping):
        return None
    source = sources.get("0")
    if not isinstance(source, Mapping) or not source.get("enable_kv_cache_events") or source.get("publisher") != "zmq":
        return None
    endpoint = source.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        return None
    address = endpoint[len("tcp://") :]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host not in ("*", "0.0.0.0", "[::]", "::"):
        return None
    backend_host = urlsplit(backend_url).hostname
    if not backend_host:
        return None
    if ":" in backend_host:
        backend_host = f"[{backend_host}]"
    return f"tcp://{backend_host}:{port}"
