"""Traffic split and shadow traffic through the gateway, with two in-process mock vLLMs (one per model version)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from backends.mock_vllm import MockConfig, MockVLLM
from backends.snapshot import ModelSnap, PoolSnap, RegistrySnapshot, ShadowSnap, SplitSnap
from governance.models import key_hash
from governance.ratelimit import LocalRateLimiter, Reservation
from governance.snapshot import KeySnap, KeySnapshot
from routing.gateway import Gateway
from routing.registry import RegistryCache
from routing.shadow import ShadowMirror, answer_texts
from tests.conftest import AUTH, usage_events
from tests.factories import backend_snap, registry_snap
from tests.routing.conftest import HostRouter

V1 = ModelSnap("chat-v1", "served-v1", "chat", "p1", (), None, 0)
V2 = ModelSnap("chat-v2", "served-v2", "chat", "p2", (), None, 0)
MYCHAT = ModelSnap("mychat", "served-v1", "chat", "p1", (), None, 0)
PROMPT = [{"role": "user", "content": "Tell me about canaries"}]
SECRET = "sk-canary"


def registry(
    *, splits: Mapping[str, SplitSnap] | None = None, shadows: Mapping[str, tuple[ShadowSnap, ...]] | None = None
) -> RegistrySnapshot:
    """Pool p1 (backend a: the mock serving served-v1) and p2 (backend b: served-v2); mychat, chat-v1, chat-v2."""
    base = registry_snap(backends=[backend_snap("a", base_url="http://mock-a")], models=[MYCHAT, V1, V2])
    pools = {
        **base.pools,
        "p2": PoolSnap("p2", "round_robin", True, (backend_snap("b", pool="p2", base_url="http://mock-b"),)),
    }
    return dataclasses.replace(base, pools=pools, splits=dict(splits or {}), shadows=dict(shadows or {}))


class Rollup:
    """A shadow comparison writer standing in for the database rollup."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, float]] = {}

    def __call__(self, hour: datetime, tallies: Mapping[tuple[str, str], Mapping[str, float]]) -> int:
        for pair, tally in tallies.items():
            row = self.rows.setdefault(pair, {})
            for k, v in tally.items():
                row[k] = row.get(k, 0) + v
        return len(tallies)


class CountingLimiter(LocalRateLimiter):
    """Counts admissions and settlements (a shadow must cause neither)."""

    def __init__(self) -> None:
        super().__init__()
        self.admitted = 0
        self.settled: list[int] = []

    async def admit(self, key: KeySnap, tokens: int) -> Reservation:
        self.admitted += 1
        return await super().admit(key, tokens)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        self.settled.append(actual_tokens)
        await super().settle(reservation, actual_tokens)


@pytest.fixture
def mock_a() -> MockVLLM:
    return MockVLLM(MockConfig(models=["served-v1"], embed_models=[]))


@pytest.fixture
def mock_b() -> MockVLLM:
    return MockVLLM(MockConfig(models=["served-v2"], embed_models=[]))


@pytest.fixture
def build(make_gateway: Callable[..., Gateway], mock_a: MockVLLM, mock_b: MockVLLM) -> Callable[..., Gateway]:
    def make(snapshot: RegistrySnapshot, **options: Any) -> Gateway:
        return make_gateway(
            registry=snapshot, transport=HostRouter({"mock-a": mock_a, "mock-b": mock_b}), max_attempts=1, **options
        )

    return make


@pytest.fixture
async def client() -> AsyncIterator[Callable[[Gateway], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(gateway: Gateway) -> httpx.AsyncClient:
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router", timeout=30)
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.aclose()


def split_of(shares: list[tuple[ModelSnap, float]], sticky_key: str = "") -> SplitSnap:
    total = sum(w for _, w in shares)
    bounds, running = [], 0.0
    for _, weight in shares:
        running += weight
        bounds.append(running / total)
    return SplitSnap("mychat", tuple(m for m, _ in shares), tuple(bounds), sticky_key)


# --- split ---------------------------------------------------------------------------------------------------


async def test_split_serves_from_both_versions_sticky_per_user_and_records_the_serving_model(
    build: Callable[..., Gateway], client: Callable[[Gateway], httpx.AsyncClient], mock_a: MockVLLM, mock_b: MockVLLM
) -> None:
    # given mychat -> 50 % chat-v1, 50 % chat-v2, sticky on the user field
    gateway = build(registry(splits={"mychat": split_of([(V1, 50), (V2, 50)], "user")}))
    c = client(gateway)
    chosen: dict[str, set[str]] = {}
    for i in range(40):
        user = f"user-{i % 20}"
        body = {"model": "mychat", "messages": PROMPT, "max_tokens": 3, "user": user}
        response = await c.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status_code == 200, response.text
        # then the client sees the name it asked for; the master key is told which model served
        assert response.json()["model"] == "mychat"
        chosen.setdefault(user, set()).add(response.headers["x-router-model"])
    # each user stayed on one version, and both versions served
    assert all(len(models) == 1 for models in chosen.values())
    assert set().union(*chosen.values()) == {"chat-v1", "chat-v2"}
    assert mock_a.stats.total_requests > 0 and mock_b.stats.total_requests > 0
    # and usage records the model that served (Prometheus labels come from the same events)
    events = list(usage_events(gateway))
    assert {e.model for e in events} == {"chat-v1", "chat-v2"}
    by_user_model = {(u, next(iter(m))) for u, m in chosen.items()}
    assert sum(1 for e in events if e.model == "chat-v2") == 2 * sum(1 for _, m in by_user_model if m == "chat-v2")


async def test_split_streams_under_the_public_name(
    build: Callable[..., Gateway], client: Callable[[Gateway], httpx.AsyncClient]
) -> None:
    gateway = build(registry(splits={"mychat": split_of([(V2, 100)])}))
    body = {"model": "mychat", "messages": PROMPT, "max_tokens": 4, "stream": True}
    response = await client(gateway).post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    assert '"model":"mychat"' in response.text and "served-v2" not in response.text
    assert usage_events(gateway)[-1].model == "chat-v2"


async def test_a_key_allowed_the_public_name_is_served_by_any_version(
    build: Callable[..., Gateway], client: Callable[[Gateway], httpx.AsyncClient]
) -> None:
    gateway = build(registry(splits={"mychat": split_of([(V2, 100)])}))
    key = KeySnap(7, "team", frozenset({"mychat"}), None, None, None, None)
    gateway.keys = RegistryCache.static(KeySnapshot(version=1, by_hash={key_hash(SECRET): key}))
    headers = {"Authorization": f"Bearer {SECRET}"}
    body = {"model": "mychat", "messages": PROMPT, "max_tokens": 2}
    response = await client(gateway).post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert "x-router-model" not in response.headers  # internal names only to the master key
    # asking for the version directly is still governed by the key's own list
    direct = await client(gateway).post("/v1/chat/completions", json={**body, "model": "chat-v2"}, headers=headers)
    assert direct.status_code == 404


# --- shadow --------------------------------------------------------------------------------------------------


def shadowing(share: float = 1.0) -> RegistrySnapshot:
    """chat-v1's requests mirrored to chat-v2 (`share` of them)."""
    return registry(shadows={"chat-v1": (ShadowSnap(V2, share),)})


async def settle(mirror: ShadowMirror, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (mirror.running or mirror.queue) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not mirror.running and not mirror.queue, mirror.stats()


async def test_a_slow_shadow_never_delays_the_client(
    build: Callable[..., Gateway], client: Callable[[Gateway], httpx.AsyncClient], mock_b: MockVLLM
) -> None:
    # given chat-v1 mirrored to a chat-v2 that takes 1 s per answer
    rollup = Rollup()
    mirror = ShadowMirror(concurrency=4, queue_max=16, flush_interval_s=0.05, write=rollup)
    gateway = build(shadowing(), shadow=mirror)
    mock_b.config.latency_s = 1.0
    c = client(gateway)
    body = {"model": "chat-v1", "messages": PROMPT, "max_tokens": 3, "temperature": 0}
    # when the client sends requests one after the other
    latencies = []
    for _ in range(4):
        started = time.perf_counter()
        response = await c.post("/v1/chat/completions", json=body, headers=AUTH)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200
        assert response.json()["model"] == "chat-v1"
    # then none waited for the shadow (each far below its 1 s), while the shadows were in flight
    assert max(latencies) < 0.5, latencies
    assert mirror.running > 0
    await settle(mirror)
    await mirror.aflush()
    # and each was mirrored and compared: same deterministic answer at temperature 0, shadow slower
    row = rollup.rows[("chat-v1", "chat-v2")]
    assert (row["mirrored"], row["errors"], row["dropped"], row["compared"], row["matched"]) == (4, 0, 0, 4, 4)
    assert row["shadow_latency_ms_sum"] > 4 * 1000 > row["primary_latency_ms_sum"]
    assert row["shadow_completion_tokens"] == row["primary_completion_tokens"] > 0
    assert mock_b.stats.last_request["model"] == "served-v2"
    assert mock_b.stats.last_request.get("stream") is None


async def test_a_flood_drops_mirrors_instead_of_queueing_them(
    build: Callable[..., Gateway], client: Callable[[Gateway], httpx.AsyncClient], mock_b: MockVLLM
) -> None:
    # given one mirror at a time and two waiting at most, and a shadow that takes 2 s
    mirror = ShadowMirror(concurrency=1, queue_max=2, flush_interval_s=60, write=Rollup())
    gateway = build(shadowing(), shadow=mirror)
    mock_b.config.latency_s = 2.0
    c = client(gateway)
    body = {"model": "chat-v1", "messages": PROMPT, "max_tokens": 2}
    labels = {"primary": "chat-v1", "shadow": "chat-v2", "outcome": "dropped"}
    dropped_before = REGISTRY.get_sample_value("llm_shadow_requests_total", labels) or 0.0
    # when 30 requests arrive at once
    started = time.perf_counter()
    responses = await asyncio.gather(*(c.post("/v1/chat/completions", json=body, headers=AUTH) for _ in range(30)))
    elapsed = time.perf_counter() - started
    # then every client got its answer without waiting for the shadow
    assert all(r.status_code == 200 for r in responses)
    assert elapsed < 1.5, elapsed
    # and the mirror stayed within its bounds: one running, two queued, the rest dropped
    assert mirror.stats() == {
        "running": 1,
        "queued": 2,
        "mirrored": 0,
        "errors": 0,
        "dropped": 27,
        "compared": 0,
        "matched": 0,
    }
    assert REGISTRY.get_sample_value("llm_shadow_requests_total", labels) == dropped_before + 27
    await mirror.aclose()
    assert mirror.running == 0 and not mirror.queue


async def test_a_stream_is_compared_on_its_assembled_text_and_a_different_answer_does_not_match(
    build: Callable[..., Gateway], client: Callable[[Gateway], httpx.AsyncClient], mock_b: MockVLLM
) -> None:
    rollup = Rollup()
    mirror = ShadowMirror(concurrency=2, queue_max=4, write=rollup)
    gateway = build(shadowing(), shadow=mirror)
    c = client(gateway)
    body = {"model": "chat-v1", "messages": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}
    response = await c.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    await settle(mirror)
    # the shadow was asked without streaming
    assert mock_b.stats.last_request.get("stream") is None
    assert "stream_options" not in mock_b.stats.last_request
    mock_b.config.answer_override = "Something else entirely"
    await c.post("/v1/chat/completions", json=body, headers=AUTH)
    await settle(mirror)
    # a request without temperature 0 is mirrored but its text is not compared
    await c.post("/v1/chat/completions", json={**body, "temperature": 0.7}, headers=AUTH)
    await settle(mirror)
    await mirror.aflush()
    row = rollup.rows[("chat-v1", "chat-v2")]
    assert (row["mirrored"], row["compared"], row["matched"]) == (3, 2, 1)


async def test_shadow_requests_are_not_charged_to_the_client_key(
    build: Callable[..., Gateway], client: Callable[[Gateway], httpx.AsyncClient]
) -> None:
    mirror = ShadowMirror(concurrency=2, queue_max=4, write=Rollup())
    limiter = CountingLimiter()
    gateway = build(shadowing(), shadow=mirror, limiter=limiter)
    key = KeySnap(9, "team", None, None, 1000, None, None)
    gateway.keys = RegistryCache.static(KeySnapshot(version=1, by_hash={key_hash(SECRET): key}))
    body = {"model": "chat-v1", "messages": PROMPT, "max_tokens": 3}
    response = await client(gateway).post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {SECRET}"}
    )
    assert response.status_code == 200
    await settle(mirror)
    # one reservation and one settlement: the client's; the shadow is recorded under its own principal
    assert limiter.admitted == 1 and len(limiter.settled) == 1
    events = list(usage_events(gateway))
    assert [(e.principal, e.key_id, e.model) for e in events] == [("team", 9, "chat-v1"), ("shadow", None, "chat-v2")]
    assert events[1].status == 200 and events[1].completion_tokens > 0


async def test_no_mirror_without_a_free_slot_nor_for_a_failed_primary(
    build: Callable[..., Gateway], client: Callable[[Gateway], httpx.AsyncClient], mock_a: MockVLLM
) -> None:
    mirror = ShadowMirror(concurrency=2, queue_max=4, write=Rollup())
    snapshot = shadowing()
    busy = dataclasses.replace(snapshot.pools["p2"].backends[0], max_concurrent_requests=1)
    snapshot = dataclasses.replace(
        snapshot, pools={**snapshot.pools, "p2": dataclasses.replace(snapshot.pools["p2"], backends=(busy,))}
    )
    gateway = build(snapshot, shadow=mirror)
    c = client(gateway)
    body = {"model": "chat-v1", "messages": PROMPT, "max_tokens": 2}
    # the shadow's only backend is at its limit (a client request holds its slot): the mirror is dropped
    gateway.dispatcher.in_flight["b"] = 1
    assert (await c.post("/v1/chat/completions", json=body, headers=AUTH)).status_code == 200
    await settle(mirror)
    assert mirror.stats()["dropped"] == 1 and mirror.stats()["mirrored"] == 0
    gateway.dispatcher.in_flight["b"] = 0
    # a primary that fails is not mirrored
    mock_a.config.fail_next = 1  # answered with a 500
    assert (await c.post("/v1/chat/completions", json=body, headers=AUTH)).status_code == 502
    await settle(mirror)
    assert mirror.stats()["mirrored"] == 0
    # and the next good one is
    assert (await c.post("/v1/chat/completions", json=body, headers=AUTH)).status_code == 200
    await settle(mirror)
    assert mirror.stats()["mirrored"] == 1


def test_answer_texts_of_json_and_streamed_answers() -> None:
    chat = {"choices": [{"index": 0, "message": {"content": "Hello"}}, {"index": 1, "message": {"content": "Hi"}}]}
    assert answer_texts("chat.completions", chat) == {0: "Hello", 1: "Hi"}
    stream = (
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\ndata: [DONE]\n\n'
    )
    assert answer_texts("chat.completions", stream, stream=True) == {0: "Hello"}
    assert answer_texts("completions", {"choices": [{"index": 0, "text": "abc"}]}) == {0: "abc"}
    assert answer_texts("embeddings", {"data": []}) is None
    assert answer_texts("chat.completions", b"not json", stream=False) is None


async def test_the_tokenizer_is_not_mirrored(
    build: Callable[..., Gateway], client: Callable[[Gateway], httpx.AsyncClient], mock_b: MockVLLM
) -> None:
    mirror = ShadowMirror(concurrency=2, queue_max=4, write=Rollup())
    gateway = build(shadowing(), shadow=mirror)
    response = await client(gateway).post("/tokenize", json={"model": "chat-v1", "prompt": "Hello"}, headers=AUTH)
    assert response.status_code == 200, response.text
    await settle(mirror)
    assert mirror.stats()["mirrored"] == 0 and mock_b.stats.total_requests == 0
    # while a completion on the same model is
    body = {"model": "chat-v1", "messages": PROMPT, "max_tokens": 2}
    assert (await client(gateway).post("/v1/chat/completions", json=body, headers=AUTH)).status_code == 200
    await settle(mirror)
    assert mirror.stats()["mirrored"] == 1 and mock_b.stats.total_requests == 1


async def test_a_flush_returns_only_once_what_was_tallied_before_it_is_written() -> None:
    # given a mirror whose background flush is writing (slowly) the comparisons tallied so far
    written: list[tuple[str, str]] = []

    def slow_write(hour: datetime, tallies: Mapping[tuple[str, str], Mapping[str, float]]) -> int:
        time.sleep(0.2)
        written.extend(tallies)
        return len(tallies)

    mirror = ShadowMirror(write=slow_write)
    mirror.tallies[("chat-v1", "chat-v2")] = {"mirrored": 1.0}
    background = asyncio.ensure_future(mirror.aflush())
    await asyncio.sleep(0.01)  # the background flush has taken the tallies and is writing them
    # when a flush is asked for meanwhile (a test, the lifespan shutdown)
    await mirror.aflush()
    # then it returned after the comparisons were written, not before
    assert written == [("chat-v1", "chat-v2")]
    await background
