"""vLLM KV-cache events: decoding (a real vLLM 0.32.0 payload and the same format hand-made), the per-backend
block index, and the subscriber against a fake ZMQ publisher."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from routing.kv_events import (
    BackendBlockIndex,
    BlockStored,
    KvEventsHub,
    SubscriberConfig,
    block_keys,
    decode_batch,
    endpoint_from_sources,
    handle_message,
)

BS = 4  # block size of the hand-made events
REAL_PAYLOAD = Path(__file__).parent / "data" / "vllm-0.32.0-kv-event-batch.msgpack"


def stored(hashes, tokens, parent=None, **extra):
    """A BlockStored event as vLLM encodes it (a map tagged by `type`)."""
    event = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None] * len(hashes),
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }
    event.update(extra)
    return event


def removed(hashes, **extra):
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU", "group_idx": 0, **extra}


def frames(seq, *events, topic=b""):
    """One message as ZmqEventPublisher sends it: topic, 8-byte big-endian seq, msgpack([ts, events, dp rank])."""
    return [topic, seq.to_bytes(8, "big"), msgspec.msgpack.encode([time.time(), list(events), 0])]


@pytest.fixture
def index():
    return BackendBlockIndex(max_blocks=1_000)


A = [1, 2, 3, 4]
B = [5, 6, 7, 8]
C = [9, 10, 11, 12]


def keys_of(*blocks, tail=()):
    return block_keys([t for block in blocks for t in block] + list(tail), BS)


# ----------------------------------------------------------------------------------------------- decoding


def test_real_vllm_payload_decodes_and_indexes_its_blocks(index):
    # given the payload vLLM 0.32.0 (CPU build) published for a 3-block prompt
    events, skipped = decode_batch(REAL_PAYLOAD.read_bytes())
    # then it holds one BlockStored of 3 blocks of 128 tokens with int hashes
    assert skipped == 0
    [event] = events
    assert isinstance(event, BlockStored)
    assert event.block_size == 128
    assert len(event.block_hashes) == 3 and all(isinstance(h, int) for h in event.block_hashes)
    assert len(event.token_ids) == 384 and event.parent_block_hash is None
    # when it is applied, a request with the same tokens plus a partial block matches all 3 blocks
    index.apply(events)
    assert index.matched_blocks(block_keys([*event.token_ids, 42, 43], 128)) == 3
    # and a request differing in the second block matches only the first
    changed = list(event.token_ids)
    changed[200] += 1
    assert index.matched_blocks(block_keys(changed, 128)) == 1


def test_unknown_event_types_are_skipped_and_known_ones_kept(index):
    # given a batch with an event type this router does not know between two known ones
    message = frames(0, stored([11], A), {"type": "BlockPinned", "block_hashes": [11]}, stored([12], B, parent=11))
    # when it is handled
    assert handle_message(index, message)
    # then both known events were applied and the unknown one counted
    assert index.matched_blocks(keys_of(A, B)) == 2
    assert index.stats().skipped == 1


@pytest.mark.parametrize(
    "message",
    [
        [b"", b"\x00" * 8],  # two frames
        [b"", b"\x00" * 4, msgspec.msgpack.encode([0.0, [], 0])],  # short seq
        [b"", b"\x00" * 8, b"\xc1 not msgpack"],
        [b"", b"\x00" * 8, msgspec.msgpack.encode({"ts": 1})],  # not a batch
    ],
)
def test_malformed_messages_change_nothing(index, message):
    assert handle_message(index, frames(0, stored([11], A)))
    assert not handle_message(index, message)
    assert index.matched_blocks(keys_of(A)) == 1
    assert index.stats().last_seq == 0


# -------------------------------------------------------------------------------------------------- index


def test_blocks_chain_through_parents_and_count_from_the_first(index):
    # given A, then B stored as A's child in a later step
    handle_message(index, frames(0, stored([11], A)))
    handle_message(index, frames(1, stored([12], B, parent=11)))
    # then a request A+B+partial matches 2 blocks, A+C 1, and C+A none (only leading blocks count)
    assert index.matched_blocks(keys_of(A, B, tail=[99])) == 2
    assert index.matched_blocks(keys_of(A, C)) == 1
    assert index.matched_blocks(keys_of(C, A)) == 0
    # and the same tokens after a different prefix are a different block
    assert not index.contains(keys_of(C, B)[1])


def test_removed_block_ends_the_match_there(index):
    handle_message(index, frames(0, stored([11, 12, 13], A + B + C)))
    handle_message(index, frames(1, removed([12])))
    assert index.matched_blocks(keys_of(A, B, C)) == 1
    assert index.stats().removed == 1


def test_all_blocks_cleared_empties_the_index(index):
    handle_message(index, frames(0, stored([11, 12], A + B)))
    handle_message(index, frames(1, {"type": "AllBlocksCleared"}))
    assert index.matched_blocks(keys_of(A, B)) == 0 and len(index) == 0


def test_child_of_an_unknown_parent_is_not_indexed(index):
    # given a subscriber that missed the parent's event
    handle_message(index, frames(5, stored([12], B, parent=11)))
    # then B cannot be keyed (its prefix is unknown) and is counted as an orphan
    assert len(index) == 0 and index.stats().orphans == 1


def test_oldest_blocks_are_forgotten_past_the_bound():
    index = BackendBlockIndex(max_blocks=2)
    handle_message(index, frames(0, stored([11], A)))
    handle_message(index, frames(1, stored([21], B)))
    handle_message(index, frames(2, stored([31], C)))
    assert len(index) == 2 and index.stats().forgotten == 1
    assert index.matched_blocks(keys_of(A)) == 0
    assert index.matched_blocks(keys_of(C)) == 1


@pytest.mark.parametrize("next_seq,counter", [(5, "gaps"), (0, "restarts")])
def test_lost_batches_or_an_engine_restart_clear_the_index(index, next_seq, counter):
    # given blocks learnt from batches 0..1
    handle_message(index, frames(0, stored([11], A)))
    handle_message(index, frames(1, stored([21], B)))
    # when the next batch skips numbers (dropped) or starts over (engine restarted)
    handle_message(index, frames(next_seq, stored([31], C)))
    # then what was learnt before is dropped, the new batch kept
    assert index.matched_blocks(keys_of(A)) == 0
    assert index.matched_blocks(keys_of(C)) == 1
    assert getattr(index.stats(), counter) == 1


def test_offloaded_tiers_and_partial_blocks_are_not_counted(index):
    handle_message(index, frames(0, stored([11], A, medium="CPU")))
    handle_message(index, frames(1, stored([21], B[:3])))  # 3 tokens for a 4-token block
    assert len(index) == 0 and index.stats().skipped == 2


def test_lora_blocks_only_match_the_same_adapter(index):
    handle_message(index, frames(0, stored([11], A, lora_name="sql")))
    assert index.matched_blocks(keys_of(A)) == 0
    assert index.matched_blocks(block_keys(A, BS, lora_name="sql")) == 1


# ----------------------------------------------------------------------------------------- endpoint discovery


@pytest.mark.parametrize(
    "url,endpoint,expected",
    [
        ("http://10.1.2.3:8000", "tcp://*:5557", "tcp://10.1.2.3:5557"),
        ("http://gpu-a.internal:8000/", "tcp://0.0.0.0:6001", "tcp://gpu-a.internal:6001"),
        ("http://[fd00::1]:8000", "tcp://*:5557", "tcp://[fd00::1]:5557"),
        ("http://10.1.2.3:8000", "tcp://127.0.0.1:5571", None),  # vLLM connects: nothing to subscribe to
        ("http://10.1.2.3:8000", "ipc:///tmp/kv", None),
        ("http://10.1.2.3:8000", "tcp://*:99999", None),
    ],
)
def test_endpoint_from_sources(url, endpoint, expected):
    sources = {"0": {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": ""}}
    assert endpoint_from_sources(url, sources) == expected


@pytest.mark.parametrize(
    "sources",
    [{}, [], {"0": {"enable_kv_cache_events": False, "publisher": "zmq", "endpoint": "tcp://*:1"}}, {"0": "x"}],
)
def test_endpoint_from_sources_without_events(sources):
    assert endpoint_from_sources("http://h:1", sources) is None


# ---------------------------------------------------------------------------------------- fake ZMQ publisher


class FakePublisher:
    """A PUB socket bound on loopback, sending what vLLM's ZmqEventPublisher sends."""

    def __init__(self, ctx: zmq.asyncio.Context, port: int | None = None) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        if port is None:
            self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        else:
            self.sock.bind(f"tcp://127.0.0.1:{port}")
            self.port = port
        self.endpoint = f"tcp://127.0.0.1:{self.port}"

    async def send(self, message):
        await self.sock.send_multipart(message)

    def close(self):
        self.sock.close(linger=0)


async def eventually(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def zctx():
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


FAST = SubscriberConfig(poll_ms=50, reconnect_min_s=0.05, reconnect_max_s=0.2)


async def test_hub_follows_a_publisher_through_an_engine_restart(zctx):
    # given a fake vLLM publisher and a hub subscribed to it
    pub = FakePublisher(zctx)
    hub = KvEventsHub(max_blocks=100, config=FAST, context=zctx)
    hub.sync({"gpu-a": pub.endpoint})
    index = hub.index("gpu-a")
    assert index is not None
    try:
        # when the engine stores A+B (re-sent until the subscription is up: ZMQ drops messages before it is)
        seq = 0
        while index.matched_blocks(keys_of(A, B)) < 2:
            await pub.send(frames(seq, stored([11, 12], A + B)))
            seq += 1
            await asyncio.sleep(0.05)
            assert seq < 100, "subscriber never received"
        # then the router sees both blocks
        assert hub.matched_blocks("gpu-a", keys_of(A, B, C)) == 2
        # when the engine restarts on the same port (new socket, sequence from 0) and stores C only
        pub.close()
        await asyncio.sleep(0.1)
        pub = FakePublisher(zctx, port=pub.port)

        async def publish_c():
            while True:
                await pub.send(frames(0, stored([31], C)))
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(publish_c())
        try:
            await eventually(lambda: index.matched_blocks(keys_of(C)) == 1)
        finally:
            sender.cancel()
        # then what the old engine held is forgotten
        assert index.matched_blocks(keys_of(A)) == 0
        stats = index.stats()
        assert stats.restarts + stats.disconnects >= 1
    finally:
        await hub.aclose()
        pub.close()


async def test_a_dropped_connection_forgets_the_engines_blocks(zctx):
    # given a subscriber that learnt A from a publisher
    pub = FakePublisher(zctx)
    hub = KvEventsHub(max_blocks=100, config=FAST, context=zctx)
    hub.sync({"gpu-a": pub.endpoint})
    index = hub.index("gpu-a")
    assert index is not None
    try:
        seq = 0
        while index.matched_blocks(keys_of(A)) < 1:
            await pub.send(frames(seq, stored([11], A)))
            seq += 1
            await asyncio.sleep(0.05)
            assert seq < 100, "subscriber never received"
        # when the engine goes away (its socket closes) and sends nothing more
        pub.close()
        # then the index empties without waiting for a new batch
        await eventually(lambda: len(index) == 0)
        assert index.stats().disconnects >= 1 and index.stats().last_seq is None
    finally:
        await hub.aclose()
        pub.close()


async def test_hub_sync_stops_removed_backends_and_restarts_changed_ones(zctx):
    pub = FakePublisher(zctx)
    hub = KvEventsHub(max_blocks=100, config=FAST, context=zctx)
    try:
        hub.sync({"gpu-a": pub.endpoint, "gpu-b": None})
        first = hub.index("gpu-a")
        assert first is not None and hub.index("gpu-b") is None
        assert hub.matched_blocks("gpu-b", keys_of(A)) is None
        # same endpoint: same subscription
        hub.sync({"gpu-a": pub.endpoint})
        assert hub.index("gpu-a") is first
        # changed endpoint: a new index
        hub.sync({"gpu-a": "tcp://127.0.0.1:1"})
        assert hub.index("gpu-a") is not first
        # gone: no index, no task left running
        hub.sync({})
        assert hub.index("gpu-a") is None and hub.stats() == {}
        await asyncio.sleep(0)
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("kv-events:")]
    finally:
        await hub.aclose()
        pub.close()


async def test_subscriber_survives_garbage_on_the_wire(zctx):
    # given a publisher that sends garbage before a valid batch
    pub = FakePublisher(zctx)
    hub = KvEventsHub(max_blocks=100, config=FAST, context=zctx)
    hub.sync({"gpu-a": pub.endpoint})
    index = hub.index("gpu-a")
    assert index is not None
    try:
        seq = 0
        while index.matched_blocks(keys_of(A)) < 1:
            await pub.send([b"", b"x", b"garbage"])
            await pub.send([b"", b"\x00" * 8, b"\xc1"])
            await pub.send(frames(seq, stored([11], A)))
            seq += 1
            await asyncio.sleep(0.05)
            assert seq < 100, "subscriber never recovered"
        # then the valid batches were applied and the task is still alive
        [task] = [t for t in asyncio.all_tasks() if t.get_name() == "kv-events:gpu-a"]
        assert not task.done()
    finally:
        await hub.aclose()
        pub.close()
