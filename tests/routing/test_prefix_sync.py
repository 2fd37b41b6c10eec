"""PrefixSync's message handling without Redis: other processes' inserts and open requests are applied, bounded."""

from __future__ import annotations

import time

import orjson

from routing.dispatch import Dispatcher
from routing.prefix import MAX_PEERS, PrefixIndex, PrefixSync


def sync() -> PrefixSync:
    return PrefixSync("redis://unused", process_id="me", stale_s=2.0)


def test_other_processes_open_requests_are_summed() -> None:
    # given two other processes' latest messages
    s = sync()
    s.apply(orjson.dumps({"from": "p1", "inserts": [], "load": {"b1": 2, "b2": 1}}))
    s.apply(orjson.dumps({"from": "p2", "inserts": [], "load": {"b1": 3}}))
    # when p1 publishes again (its requests ended)
    s.apply(orjson.dumps({"from": "p1", "inserts": [], "load": {}}))
    # then only each process's latest counts are summed
    assert s.peer_in_flight == {"b1": 3}


def test_own_messages_and_malformed_loads_are_ignored() -> None:
    # given this process's own message and hostile or broken ones
    s = sync()
    s.apply(orjson.dumps({"from": "me", "inserts": [], "load": {"b1": 5}}))
    s.apply(orjson.dumps({"from": "p1", "inserts": [], "load": {"b1": "many", "b2": -4, "b3": 10**9}}))
    s.apply(orjson.dumps({"from": "p2", "inserts": [], "load": ["b1"]}))
    s.apply(b"not json")
    # then nothing counts
    assert s.peer_in_flight == {}


def test_a_silent_process_stops_counting() -> None:
    # given a process heard from longer ago than stale_s, and one heard from just now
    s = PrefixSync("redis://unused", process_id="me", stale_s=0.05)
    s.apply(orjson.dumps({"from": "old", "inserts": [], "load": {"b1": 4}}))
    time.sleep(0.1)
    s.apply(orjson.dumps({"from": "new", "inserts": [], "load": {"b2": 1}}))
    # when the sender's periodic expiry runs
    s.expire(time.monotonic())
    # then only the live process's requests count
    assert s.peer_in_flight == {"b2": 1}


def test_peers_remembered_are_bounded() -> None:
    # given more distinct senders than MAX_PEERS
    s = sync()
    for i in range(MAX_PEERS + 50):
        s.apply(orjson.dumps({"from": f"p{i}", "inserts": [], "load": {"b1": 1}}))
    # then at most MAX_PEERS are remembered, and inserts still apply
    assert s.peer_in_flight == {"b1": MAX_PEERS}
    index = PrefixIndex()
    s.attach("pool", index)
    s.apply(orjson.dumps({"from": "p-late", "inserts": [["pool", "b2", [1, 2]]], "load": {"b1": 1}}))
    assert index.match((1, 2), "b2") == 2


async def test_the_dispatcher_publishes_its_own_open_requests() -> None:
    # given a dispatcher with a prefix sync, and requests open on b1 in this process
    s = sync()
    dispatcher = Dispatcher(prefix_sync=s)
    dispatcher.in_flight["b1"] += 2
    dispatcher.in_flight["b2"] += 0
    try:
        # when the sync reads what to publish as this process's load
        assert s.load_source is not None
        # then it is the dispatcher's live counters (only backends with requests open)
        assert {k: v for k, v in s.load_source().items() if v} == {"b1": 2}
        dispatcher.in_flight["b1"] -= 2
        assert not any(s.load_source().values())
    finally:
        await dispatcher.aclose()
