"""Precise prefix mode in the dispatcher: token ids from /tokenize, blocks from the engines' events, fallbacks."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from typing import Any

import httpx

from backends.mock_vllm import MockConfig, MockServer, MockVLLM, await_until, chat_prompt_token_ids, free_port
from backends.snapshot import RegistrySnapshot
from routing.dispatch import Dispatcher
from routing.gateway import Gateway
from routing.kv_events import BackendBlockIndex, BlockStored, IndexStats
from routing.precise import PreciseConfig, PreciseRouting
from routing.registry import RegistryCache
from routing.usage import MemoryUsageSink
from tests.conftest import AUTH, MASTER_KEY
from tests.factories import backend_snap, registry_snap
from tests.routing.conftest import HostRouter

BLOCK = 16  # the mock's prefix-cache block size, as a GPU vLLM's
_hashes = itertools.count(1)


class FakeHub:
    """A KvEventsHub without sockets: indexes fed by hand, and the endpoints it was asked to follow."""

    def __init__(self, live: Mapping[str, list[list[int]]] | None = None) -> None:
        self.indexes: dict[str, BackendBlockIndex] = {}
        self.synced: list[dict[str, str | None]] = []
        self.closed = False
        for name, prompts in (live or {}).items():
            self.indexes[name] = BackendBlockIndex(max_blocks=10_000)
            for tokens in prompts:
                self.store(name, tokens)

    def store(self, name: str, tokens: list[int]) -> None:
        """The engine of `name` published the full blocks of this prompt (as vLLM does after its prefill)."""
        n = len(tokens) // BLOCK
        event = BlockStored(
            block_hashes=[next(_hashes) for _ in range(n)],
            parent_block_hash=None,
            token_ids=tokens[: n * BLOCK],
            block_size=BLOCK,
        )
        self.indexes[name].apply([event])

    def sync(self, endpoints: Mapping[str, str | None]) -> None:
        self.synced.append(dict(endpoints))

    def index(self, name: str) -> BackendBlockIndex | None:
        return self.indexes.get(name)

    def stats(self) -> dict[str, IndexStats]:
        return {name: index.stats() for name, index in self.indexes.items()}

    async def aclose(self) -> None:
        self.closed = True


def messages(document: int, question: str) -> list[dict[str, str]]:
    text = " ".join(f"fact{document}-{i}" for i in range(120))
    return [{"role": "system", "content": text}, {"role": "user", "content": question}]


def mocks() -> dict[str, MockVLLM]:
    return {host: MockVLLM(MockConfig(models=["served-chat", "served-text"])) for host in ("m1", "m2")}


def gateway(
    apps: Mapping[str, MockVLLM], precise: PreciseRouting | None, *, strategy: str = "prefix_aware"
) -> tuple[Gateway, RegistrySnapshot]:
    registry = registry_snap(
        backends=[backend_snap("b1", base_url="http://m1"), backend_snap("b2", base_url="http://m2")],
        strategy=strategy,
    )
    dispatcher = Dispatcher(transport=HostRouter(apps), precise=precise)
    gw = Gateway(
        None,
        registry=RegistryCache.static(registry),
        dispatcher=dispatcher,
        master_key=MASTER_KEY,
        usage=MemoryUsageSink(),
    )
    return gw, registry


def client(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://router", headers=AUTH)


async def ask(c: httpx.AsyncClient, document: int, question: str) -> str:
    body = {"model": "chat-model", "messages": messages(document, question), "max_tokens": 1}
    response = await c.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.headers["x-router-backend"]


def tokenize_calls(apps: Mapping[str, MockVLLM]) -> int:
    return sum(app.stats.by_path.get("/tokenize", 0) for app in apps.values())


async def test_requests_go_where_the_engines_report_their_prefix() -> None:
    # given two engines that published the blocks of six documents, three each (b1 even, b2 odd)
    held: dict[str, list[list[int]]] = {"b1": [], "b2": []}
    for doc in range(6):
        held["b1" if doc % 2 == 0 else "b2"].append(chat_prompt_token_ids(messages(doc, "first question")))
    hub = FakeHub(held)
    apps = mocks()
    gw, _ = gateway(apps, PreciseRouting(PreciseConfig(tokenize_timeout_s=2.0), hub=hub))
    async with client(gw) as c:
        # when another question about each document arrives
        chosen = [await ask(c, doc, "another question?") for doc in range(6)]
        # then each went to the engine holding its document, after one /tokenize each
        assert chosen == ["b1", "b2"] * 3
        assert tokenize_calls(apps) == 6
        assert gw.dispatcher.precise is not None and gw.dispatcher.precise.tokenized == 6
        # and the runtime view shows what each engine holds
        stats = gw.dispatcher.runtime_stats()
        blocks = [stats[name]["kv_events_blocks"] for name in ("b1", "b2")]
        assert blocks[0] == blocks[1] and isinstance(blocks[0], int) and blocks[0] > 0
        await gw.dispatcher.aclose()


async def test_a_slow_tokenizer_falls_back_to_the_approximate_mode_and_rests() -> None:
    # given events from b1 only, and b1 answering /tokenize (like everything) after 1 s
    hub = FakeHub({"b1": [chat_prompt_token_ids(messages(0, "q"))]})
    apps = mocks()
    apps["m1"].config.latency_s = 1.0
    precise = PreciseRouting(PreciseConfig(tokenize_timeout_s=0.05, retry_after_s=60.0), hub=hub)
    gw, _ = gateway(apps, precise)
    async with client(gw) as c:
        # when two requests arrive
        for question in ("one?", "two?"):
            await ask(c, 0, question)
        await gw.dispatcher.aclose()
    # then both were served; the first waited at most the timeout for token ids, and the second did not ask
    assert precise.tokenize_failures == 1 and precise.tokenized == 0
    assert apps["m1"].stats.by_path.get("/tokenize", 0) == 1


async def test_nothing_is_asked_for_other_strategies_or_without_events() -> None:
    apps = mocks()
    # given precise mode on, but a round-robin pool
    gw, _ = gateway(apps, PreciseRouting(hub=FakeHub({"b1": [[1] * 64], "b2": [[1] * 64]})), strategy="round_robin")
    async with client(gw) as c:
        await ask(c, 0, "q")
        await gw.dispatcher.aclose()
    # given a prefix_aware pool whose engines publish nothing
    gw2, _ = gateway(apps, PreciseRouting(hub=FakeHub()))
    async with client(gw2) as c:
        await ask(c, 0, "q")
        await gw2.dispatcher.aclose()
    # given a prefix_aware pool with precise mode off
    gw3, _ = gateway(apps, None)
    async with client(gw3) as c:
        await ask(c, 0, "q")
    # then no request cost a /tokenize
    assert tokenize_calls(apps) == 0


async def test_discovery_subscribes_to_publishing_backends_and_follows_the_registry() -> None:
    # given three backends: one publishing (vLLM binds tcp://*:5581), one not, one unreachable after a first answer
    sources = {
        "0": {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5581", "topic": "kv"},
    }
    down: set[str] = set()

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/kv_event_sources"
        if request.url.host in down:
            raise httpx.ConnectError("refused", request=request)
        if request.url.host in ("pub", "flaky"):
            return httpx.Response(200, json=sources)
        return httpx.Response(404, json={"detail": "Not Found"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    hub = FakeHub()
    precise = PreciseRouting(PreciseConfig(discovery_interval_s=60.0), hub=hub)
    backends = [
        backend_snap("pub", base_url="http://pub:8000"),
        backend_snap("plain", base_url="http://plain:8000"),
        backend_snap("flaky", base_url="http://flaky:8000"),
    ]
    registry = registry_snap(backends=backends, strategy="prefix_aware")
    # when the dispatcher first sees the registry
    precise.observe(registry, lambda: http)
    assert await await_until(lambda: len(hub.synced) == 1)
    # then it subscribes to the publishers, at the backend's own host
    assert hub.synced[-1] == {"pub": "tcp://pub:5581", "plain": None, "flaky": "tcp://flaky:5581"}
    # when one becomes unreachable and the registry changes (a backend removed)
    down.add("flaky")
    precise.observe(registry_snap(backends=backends[1:], strategy="prefix_aware", version=2), lambda: http)
    assert await await_until(lambda: len(hub.synced) == 2)
    # then the removed one is unsubscribed and the unreachable one keeps its subscription
    assert hub.synced[-1] == {"plain": None, "flaky": "tcp://flaky:5581"}
    # and a pool that is not prefix_aware is not asked at all
    precise.observe(registry_snap(backends=backends, strategy="round_robin", version=3), lambda: http)
    assert await await_until(lambda: len(hub.synced) == 3)
    assert hub.synced[-1] == {}
    # when the process shuts down, discovery and the subscriptions stop
    await precise.aclose()
    assert hub.closed
    await http.aclose()


async def test_completion_prompts_of_token_ids_need_no_tokenize() -> None:
    # given b2 holding a completion prompt given as token ids
    prompt = list(range(1000, 1100))
    hub = FakeHub({"b1": [list(range(5000, 5100))], "b2": [prompt]})
    precise = PreciseRouting(hub=hub)
    sent: list[dict[str, Any]] = []
    for tail in range(4):
        data = {"model": "served-text", "prompt": [*prompt, tail]}
        ids = await precise.token_ids("completions", data, backend=backend_snap("b2"), **_no_upstream())
        assert ids is not None
        sent.append(precise.cached_blocks([backend_snap("b1"), backend_snap("b2")], ids))
    # then the blocks are counted from the ids themselves
    assert sent == [{"b1": (0, 6), "b2": (6, 6)}] * 4
    assert precise.tokenized == 0 and precise.tokenize_failures == 0


def _no_upstream() -> dict[str, Any]:
    class Refuse:
        async def send(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("no request expected")

        async def aclose(self) -> None:
            pass

    return {"upstream": Refuse(), "url": "http://unused", "headers": {}}


async def test_live_engines_publishing_events_route_traffic_the_router_never_sent() -> None:
    # given two mock engines on real sockets publishing their KV-cache events, behind a gateway in precise mode
    servers = [MockServer(models=["served-chat", "served-text"], kv_events_port=free_port()) for _ in range(2)]
    async with servers[0], servers[1]:
        backends = [backend_snap(f"b{i + 1}", base_url=s.url) for i, s in enumerate(servers)]
        precise = PreciseRouting(PreciseConfig(tokenize_timeout_s=5.0))
        gw = Gateway(
            None,
            registry=RegistryCache.static(registry_snap(backends=backends, strategy="prefix_aware")),
            dispatcher=Dispatcher(precise=precise),
            master_key=MASTER_KEY,
            usage=MemoryUsageSink(),
        )
        hub = precise.hub
        async with client(gw) as c, httpx.AsyncClient(timeout=10) as direct:
            # the first request makes the process find the publishers and subscribe (it is routed approximately)
            await ask(c, 100, "warm up")
            assert await await_until(lambda: all(hub.index(b.name) is not None for b in backends), timeout=10)
            await asyncio.sleep(0.5)  # a SUB socket hears only what is published after it connected

            async def straight_to(server: MockServer, document: int, question: str) -> None:
                body = {"model": "served-chat", "messages": messages(document, question), "max_tokens": 1}
                (await direct.post(f"{server.url}/v1/chat/completions", json=body)).raise_for_status()

            for i, server in enumerate(servers):
                await straight_to(server, 200 + i, "prime")
            assert await await_until(lambda: all(precise.live(b.name) for b in backends), timeout=10)
            chosen = []
            for doc in range(6):
                # when a document is first sent straight to one engine (traffic this router never saw)
                name, server = backends[doc % 2].name, servers[doc % 2]
                index = hub.index(name)
                assert index is not None
                stored = index.stats().stored
                await straight_to(server, doc, "first question")

                def heard(index: BackendBlockIndex = index, stored: int = stored) -> bool:
                    return index.stats().stored > stored

                assert await await_until(heard, timeout=10)
                # and then asked about through the router
                chosen.append(await ask(c, doc, "another question?"))
            # then every question went to the engine holding its document
            assert chosen == ["b1", "b2"] * 3
            assert precise.tokenized >= 6 and precise.tokenize_failures == 0
        await gw.dispatcher.aclose()
    # and shutting down closed every subscription
    assert all(hub.index(b.name) is None for b in backends)


def test_settings_turn_precise_mode_on(settings: Any) -> None:
    # given the default settings, then precise mode is off: the dispatcher holds nothing of it
    assert Gateway.from_settings(None).dispatcher.precise is None
    # given ROUTER_KV_EVENTS and its bounds, then each web process's dispatcher gets it, configured
    settings.ROUTER_KV_EVENTS = True
    settings.ROUTER_KV_EVENTS_TOKENIZE_TIMEOUT_MS = 250
    settings.ROUTER_KV_EVENTS_MAX_BLOCKS = 1234
    settings.ROUTER_KV_EVENTS_RECENT_MS = 500
    gw = Gateway.from_settings(None)
    precise = gw.dispatcher.precise
    assert precise is not None
    assert precise.config.tokenize_timeout_s == 0.25 and precise.config.max_blocks == 1234
    assert gw.dispatcher.prefix_config.recent_s == 0.5
