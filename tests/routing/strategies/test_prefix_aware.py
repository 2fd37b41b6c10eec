"""Prefix-aware routing: a prompt goes where its longest prefix was sent, within a load guard, with bounded memory."""

from __future__ import annotations

import gc
import random
import tracemalloc

from routing.dispatch import RequestContext
from routing.prefix import PrefixConfig, PrefixIndex, RecentPlacements, prefix_blocks, prompt_bytes
from routing.strategies import BackendMetrics, PrefixAware, RoutingStats
from tests.factories import backend_snap

BACKENDS = [backend_snap("b1"), backend_snap("b2"), backend_snap("b3")]
DOCUMENT = " ".join(f"word{i}" for i in range(400))  # ~3.6 kB: ~28 blocks


def chat(*turns: str, system: str = DOCUMENT) -> dict:
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"model": "m", "messages": messages}


def blocks_of(data: dict, endpoint: str = "chat.completions") -> tuple[int, ...]:
    return RequestContext(endpoint=endpoint, data=data).prefix_blocks(128)


def route(strategy: PrefixAware, data: dict, in_flight: dict[str, int] | None = None, **metrics: float) -> str:
    stats = RoutingStats(
        in_flight=in_flight or {},
        metrics={name: BackendMetrics(waiting=w) for name, w in metrics.items()},
        prefix=blocks_of(data),
    )
    return strategy.select(BACKENDS, stats).name


def test_questions_on_one_document_follow_the_first() -> None:
    # given a first question about a document, sent to whichever backend was least loaded
    strategy = PrefixAware()
    first = route(strategy, chat("What is word7?"), in_flight={"b1": 2, "b2": 0, "b3": 1})
    assert first == "b2"
    # when other questions about the same document arrive while b2 is the busiest (within the guard)
    # then they all go to b2, which holds the document's prefix
    for question in ("Summarise it.", "Which word comes last?", "Count the words."):
        assert route(strategy, chat(question), in_flight={"b1": 0, "b2": 3, "b3": 0}) == "b2"


def test_a_conversation_stays_with_its_history() -> None:
    # given a conversation whose turns each resend the whole history
    strategy = PrefixAware()
    history = ["Hello there, " * 20]
    first = route(strategy, chat(*history))
    # when it goes on for five turns, other load notwithstanding
    for turn in range(5):
        history += [f"answer {turn} " * 10, f"question {turn} " * 10]
        # then every turn lands on the backend that holds the earlier turns
        assert route(strategy, chat(*history), in_flight={first: 2}) == first


def test_load_guard_sends_a_hot_prefix_elsewhere() -> None:
    # given a document placed on b1
    strategy = PrefixAware(config=PrefixConfig(balance_abs=4, balance_rel=1.5))
    assert route(strategy, chat("q0"), in_flight={"b2": 1, "b3": 1}) == "b1"
    # when b1 is far more loaded than the others (5 more in flight, and over 1.5x)
    # then the next question goes to the least loaded backend instead
    assert route(strategy, chat("q1"), in_flight={"b1": 6, "b2": 1, "b3": 0}) == "b3"
    # and vLLM's waiting queue counts as load too
    assert route(strategy, chat("q2"), in_flight={"b1": 1}, b1=9.0) != "b1"


def test_within_the_guard_the_cache_wins() -> None:
    strategy = PrefixAware(config=PrefixConfig(balance_abs=4, balance_rel=1.5))
    assert route(strategy, chat("q0"), in_flight={"b2": 1, "b3": 1}) == "b1"
    assert route(strategy, chat("q1"), in_flight={"b1": 4, "b2": 0, "b3": 0}) == "b1"  # 4 more, not over 4


def test_a_small_match_is_treated_as_new() -> None:
    # given a long prompt that shares only its first block with one sent to b1
    strategy = PrefixAware(config=PrefixConfig(min_match=0.5))
    short = {"model": "m", "prompt": "x" * 300}
    assert strategy.select(BACKENDS, RoutingStats(prefix=blocks_of(short, "completions"))).name in {"b1", "b2", "b3"}
    long = {"model": "m", "prompt": "x" * 140 + "y" * 2000}
    shared_backend = strategy.select(BACKENDS, RoutingStats(prefix=blocks_of(short, "completions"))).name
    # when it arrives with the sharing backend busier by one
    chosen = strategy.select(
        BACKENDS, RoutingStats(in_flight={shared_backend: 1}, prefix=blocks_of(long, "completions"))
    ).name
    # then it goes to a less loaded one: one block in 16 is below the threshold
    assert chosen != shared_backend


def test_new_prompts_spread_over_equally_loaded_backends_the_same_way_everywhere() -> None:
    # given two independent strategy instances (two processes) and equal loads
    one, two = PrefixAware(), PrefixAware()
    prompts = [chat(system=f"document {i} " * 60) for i in range(300)]
    # when both route the same new prompts
    first = [route(one, p) for p in prompts]
    second = [route(two, p) for p in prompts]
    # then they agree on every one, and the prompts spread over all backends
    assert first == second
    assert {first.count(b.name) for b in BACKENDS} <= set(range(70, 131))


def test_a_new_prompt_counts_the_other_processes_load() -> None:
    # given a backend idle in this process but busy in the others (their published open requests)
    strategy = PrefixAware()
    stats = RoutingStats(
        in_flight={"b1": 1, "b2": 1, "b3": 1},
        peer_in_flight={"b1": 3, "b3": 2},
        prefix=blocks_of(chat(system="a new conversation " * 60)),
    )
    # when a new prompt (nothing cached anywhere) is routed
    chosen = strategy.select(BACKENDS, stats)
    # then it goes to the backend least loaded over all processes, not the one this process happens to favour
    assert chosen.name == "b2"


def test_the_load_guard_counts_the_other_processes_load() -> None:
    # given a document cached on b1, which the other processes load heavily while this one sends it nothing
    strategy = PrefixAware(config=PrefixConfig(balance_abs=4, balance_rel=1.5))
    route(strategy, chat("first question"))
    owner = route(strategy, chat("second question"))
    stats = RoutingStats(peer_in_flight={owner: 20}, prefix=blocks_of(chat("third question")))
    # when another question on it comes
    chosen = strategy.select(BACKENDS, stats)
    # then the guard sends it elsewhere
    assert chosen.name != owner


def test_drained_or_failed_backend_is_forgotten() -> None:
    strategy = PrefixAware()
    placed = route(strategy, chat("q"))
    assert strategy.index.size(placed) > 0
    strategy.forget(placed)
    assert strategy.index.size(placed) == 0
    strategy.index.insert("b9", (1, 2, 3))
    strategy.index.keep_only(["b1", "b2"])
    assert strategy.index.backends() == [b for b in ("b1", "b2") if strategy.index.size(b)]


def test_prompt_bytes_are_the_conversation_in_engine_order() -> None:
    earlier = prompt_bytes("chat.completions", chat("first question"))
    later = prompt_bytes("chat.completions", chat("first question", "an answer", "a follow-up"))
    # the earlier conversation is a prefix of the later one (but for the closing bracket)
    assert later.startswith(earlier[:-1])
    with_tools = prompt_bytes("chat.completions", {**chat("q"), "tools": [{"type": "function"}]})
    assert with_tools.startswith(b'[{"type":"function"}]')
    assert prompt_bytes("embeddings", {"input": "x"}) == b""


def test_block_keys_chain() -> None:
    a = prefix_blocks(b"a" * 128 + b"b" * 128, 128)
    b = prefix_blocks(b"c" * 128 + b"b" * 128, 128)
    assert len(a) == 2 and a[1] != b[1]  # the same second block after a different first one differs
    assert prefix_blocks(b"x" * 127, 128) == ()


def test_index_memory_stays_within_its_cap() -> None:
    # given an index capped at 20,000 blocks per backend
    index = PrefixIndex(max_blocks=20_000)
    rng = random.Random(7)
    gc.collect()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    # when 100,000 distinct long prompts (~2 kB each, 16 blocks) are routed to three backends
    peak_after_fill = 0
    for i in range(100_000):
        prompt = f"{i}:{rng.random()}".encode() * 100
        index.insert(f"b{i % 3}", prefix_blocks(prompt[:2048], 128))
        if i == 20_000:
            peak_after_fill = tracemalloc.get_traced_memory()[0] - baseline
    used = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    # then each backend holds at most the cap, and memory stopped growing once the caps were reached
    assert all(index.size(f"b{i}") == 20_000 for i in range(3))
    assert used <= peak_after_fill * 1.1
    assert used < 3 * 20_000 * 200  # under 200 bytes a block


# --- precise mode: the engines' own KV-cache events (stats.cached_blocks) -------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def route_precise(
    strategy: PrefixAware,
    data: dict,
    cached: dict[str, tuple[int, int]],
    in_flight: dict[str, int] | None = None,
) -> str:
    stats = RoutingStats(in_flight=in_flight or {}, prefix=blocks_of(data), cached_blocks=cached)
    return strategy.select(BACKENDS, stats).name


def test_precise_counts_what_the_engine_holds_not_what_the_router_sent() -> None:
    # given a document this process sent to b1 (its approximate memory), which b1's engine has since evicted,
    # while b3's engine reports holding all five of its blocks (sent there by another router)
    strategy = PrefixAware()
    assert route(strategy, chat("q0"), in_flight={"b2": 1, "b3": 1}) == "b1"
    strategy.recent = RecentPlacements(0.0)  # nothing of the router's own placements counts here
    # when the next question arrives with every engine's events
    chosen = route_precise(strategy, chat("q1"), {"b1": (0, 5), "b2": (0, 5), "b3": (5, 5)})
    # then it goes where the blocks are, and the estimated hit ratio counts the engine's figure
    assert chosen == "b3"
    assert strategy.index.hit_ratio("b3") == 1.0
    assert strategy.precise_decisions == 1


def test_a_backend_without_events_is_scored_by_the_approximate_index() -> None:
    # given a document sent to b1, which publishes no events, while b2 and b3 report holding nothing of it
    strategy = PrefixAware()
    assert route(strategy, chat("q0"), in_flight={"b2": 1, "b3": 1}) == "b1"
    # when the next question arrives
    chosen = route_precise(strategy, chat("q1"), {"b2": (0, 5), "b3": (0, 5)}, in_flight={"b1": 1})
    # then b1 wins on its approximate match
    assert chosen == "b1"


def test_precise_mode_keeps_the_load_guard() -> None:
    # given b2's engine holding the whole prompt, but b2 far busier than the others
    strategy = PrefixAware(config=PrefixConfig(balance_abs=4, balance_rel=1.5))
    cached = {"b1": (0, 5), "b2": (5, 5), "b3": (0, 5)}
    # when a request arrives within the guard, then the cache wins
    assert route_precise(strategy, chat("q0"), cached, in_flight={"b2": 4}) == "b2"
    # when b2 is over the guard, then the least loaded takes it
    assert route_precise(strategy, chat("q1"), cached, in_flight={"b1": 1, "b2": 9}) == "b3"


def test_precise_mode_keeps_the_minimum_match() -> None:
    # given b2's engine holding only the first of ten blocks (below the 0.3 threshold) and b2 busier by one
    strategy = PrefixAware(config=PrefixConfig(min_match=0.3))
    cached = {"b1": (0, 10), "b2": (1, 10), "b3": (0, 10)}
    # when the request arrives, then it is treated as new: a least loaded backend
    assert route_precise(strategy, chat("q", system="alpha " * 300), cached, in_flight={"b2": 1}) in {"b1", "b3"}
    # and with four blocks held it is a match
    cached["b2"] = (4, 10)
    assert route_precise(strategy, chat("q", system="beta " * 300), cached, in_flight={"b2": 1}) == "b2"


def test_precise_ties_go_by_the_prompt_hash_the_same_way_in_every_process() -> None:
    # given two processes whose approximate memories differ (only the first has routed anything)
    one, two = PrefixAware(), PrefixAware()
    for i in range(50):
        route(one, chat(system=f"other document {i} " * 60))
    prompts = [chat(system=f"document {i} " * 60) for i in range(200)]
    nothing = {"b1": (0, 6), "b2": (0, 6), "b3": (0, 6)}
    # when both route the same new prompts with the same events (nothing cached anywhere)
    first = [route_precise(one, p, nothing) for p in prompts]
    second = [route_precise(two, p, nothing) for p in prompts]
    # then they agree on every one, spread over all backends
    assert first == second
    assert {first.count(b.name) for b in BACKENDS} <= set(range(40, 95))


def test_a_prompt_still_in_prefill_is_followed_until_its_events_arrive() -> None:
    # given a new document placed on one backend a moment ago: its engine has not published its blocks yet
    clock = Clock()
    strategy = PrefixAware(config=PrefixConfig(recent_s=2.0))
    strategy.recent = RecentPlacements(2.0, clock=clock)
    nothing = {"b1": (0, 5), "b2": (0, 5), "b3": (0, 5)}
    placed = route_precise(strategy, chat("q0"), nothing)
    # when a second question about it arrives 1 s later, its backend busier by one
    clock.now += 1.0
    # then it follows the first (the router's own recent placement counts beside the events)
    assert route_precise(strategy, chat("q1"), nothing, in_flight={placed: 1}) == placed
    # but 3 s after the last placement only the events count: nothing cached, so the least loaded
    clock.now += 3.0
    assert route_precise(strategy, chat("q2"), nothing, in_flight={placed: 1}) != placed


def test_recent_placements_are_bounded() -> None:
    clock = Clock()
    recent = RecentPlacements(10.0, max_entries=100, clock=clock)
    for i in range(1_000):
        recent.add("b1", (i, i + 1_000_000))
    assert len(recent) == 100
    assert recent.match((999, 1_000_999), "b1") == 2
    assert recent.match((0,), "b1") == 0
    clock.now += 11.0
    recent.add("b2", (1,))
    assert len(recent) == 1  # the expired ones went with the next placement
    recent.drop("b2")
    assert len(recent) == 0
