"""The mock's KV-cache events: what vLLM publishes with `--kv-events-config`, from the mock's prefix cache.

vLLM (0.32, `vllm/distributed/kv_events.py`) sends, after each engine step that changed its prefix cache, a
ZeroMQ PUB message `[topic, seq (8 bytes, big-endian), msgpack([ts, events, data_parallel_rank])]`, each event a
map tagged by `type`: `BlockStored` (new full blocks, their parent, their token ids), `BlockRemoved` (evicted),
`AllBlocksCleared`. Block hashes are unsigned 64-bit ints. The mock publishes the same after each request's
prefix-cache lookup, with its own block hashes and the token ids its /tokenize hands out, so a router can be
tested against it (routing/kv_events.py subscribes). Enabled by `MockConfig.kv_events_port`: the PUB socket binds
127.0.0.1:PORT and GET /kv_event_sources reports `tcp://*:PORT`, as a vLLM that binds every interface would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

MASK_64 = (1 << 64) - 1
TOPIC = "kv"


def kv_event_sources(port: int | None) -> dict[str, Any]:
    """The body of GET /kv_event_sources (vLLM: one entry per data-parallel rank; {} without events)."""
    if port is None:
        return {}
    return {
        "0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{port}",
            "replay_endpoint": None,
            "buffer_steps": 10000,
            "hwm": 100000,
            "max_queue_size": 100000,
            "topic": TOPIC,
        }
    }


def events_from_journal(journal: Sequence[tuple[Any, ...]], token_ids: Sequence[int], block_size: int) -> list[dict]:
    """vLLM's event maps for the prefix cache's journal of one lookup (`PrefixCache.journal`)."""
    events: list[dict[str, Any]] = []
    for entry in journal:
        if entry[0] == "stored":
            _, parent, hashes, start = entry
            events.append(
                {
                    "type": "BlockStored",
                    "block_hashes": [h & MASK_64 for h in hashes],
                    "parent_block_hash": None if parent is None else parent & MASK_64,
                    "token_ids": list(token_ids[start * block_size : (start + len(hashes)) * block_size]),
                    "block_size": block_size,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                    "extra_keys": [None] * len(hashes),
                    "group_idx": 0,
                    "kv_cache_spec_kind": "full_attention",
                }
            )
        elif entry[0] == "removed":
            events.append(
                {
                    "type": "BlockRemoved",
                    "block_hashes": [h & MASK_64 for h in entry[1]],
                    "medium": "GPU",
                    "group_idx": 0,
                }
            )
        else:
            events.append({"type": "AllBlocksCleared"})
    return events


class KvEventPublisher:
    """A ZMQ PUB socket bound on 127.0.0.1:port sending vLLM's KV event batches (pyzmq imported only when used)."""

    def __init__(self, port: int) -> None:
        import zmq

        self.port = port
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(f"tcp://127.0.0.1:{port}")
        self._seq = 0

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Send one batch (nothing when there are no events); never blocks (PUB drops past its high-water mark)."""
        if not events:
            return
        import msgspec
        import zmq

        payload = msgspec.msgpack.encode([time.time(), events, 0])
        frames = [TOPIC.encode(), self._seq.to_bytes(8, "big"), payload]
        self._seq += 1
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        """Unbind and close the socket."""
        self._socket.close(linger=0)
