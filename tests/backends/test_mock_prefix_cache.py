"""The mock vLLM's prefix cache, prefill delay, prefix-cache metrics and continuous usage stats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from backends.mock_vllm import MockConfig, MockVLLM, chat_prompt_token_count, chat_prompt_tokens
from backends.mock_vllm.__main__ import build_parser, config_from_args
from backends.mock_vllm.prefix_cache import PrefixCache

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _words(prefix: str, count: int) -> str:
    """Return count distinct one-token words, e.g. 'a0 a1 a2'."""
    return " ".join(f"{prefix}{i}" for i in range(count))


class FakeSleep:
    """Records the waits the app asks for instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def app() -> MockVLLM:
    """A mock with the default prefix cache (4096 blocks of 16 tokens)."""
    return MockVLLM()


@pytest.fixture
def fake_sleep(app: MockVLLM) -> FakeSleep:
    """Replace the app's first-token wait by a recorder."""
    recorder = FakeSleep()
    app.sleep = recorder
    return recorder


@pytest.fixture
async def client(app: MockVLLM) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the app in-process."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as c:
        yield c


async def _send_chat(client: httpx.AsyncClient, messages: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    """Post a chat request and check it succeeded."""
    resp = await client.post(CHAT, json={"model": "mock-chat", "messages": messages, **extra})
    assert resp.status_code == 200, resp.text
    return resp


def _counters(app: MockVLLM) -> tuple[int, int]:
    """Return (prefix cache query tokens, hit tokens) so far."""
    return app.stats.prefix_cache_queries_total, app.stats.prefix_cache_hits_total


def _sse(text: str) -> list[Any]:
    """Decode an SSE body into its JSON events (and '[DONE]')."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block:
            payload = block.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return out


# ---------------------------------------------------------------------------------------------
# Hits and queries, counted exactly.
# ---------------------------------------------------------------------------------------------


def test_chat_tokens_are_the_template_the_usage_counts() -> None:
    """The cache keys on the chat template's tokens: as many as usage.prompt_tokens, earlier turns first."""
    turn1 = [{"role": "system", "content": "Be brief ."}, {"role": "user", "content": "Hi !"}]
    turn2 = [*turn1, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert len(chat_prompt_tokens(turn1)) == chat_prompt_token_count(turn1) == 4 + 3 + 4 + 2 + 3
    assert chat_prompt_tokens(turn2)[: len(chat_prompt_tokens(turn1))] == chat_prompt_tokens(turn1)


async def test_repeated_prompt_hits_every_full_block_but_the_last_token(
    client: httpx.AsyncClient, app: MockVLLM
) -> None:
    """A repeated prompt hits its full blocks, never its last token (vLLM recomputes it for the logits)."""
    # given a 32-token prompt (25 content tokens + 4 message + 3 generation-prompt tokens) = two full blocks
    messages = [{"role": "user", "content": _words("w", 25)}]
    # when it is sent twice
    first = await _send_chat(client, messages)
    after_first = _counters(app)
    await _send_chat(client, messages)
    # then both are queried in full; the first hits nothing, the second one block (16), not 32
    assert first.json()["usage"]["prompt_tokens"] == 32
    assert after_first == (32, 0)
    assert _counters(app) == (64, 16)
    # and a 33-token prompt, sent twice, hits both of its full blocks
    longer = [{"role": "user", "content": _words("w", 26)}]
    await _send_chat(client, longer)
    await _send_chat(client, longer)
    # (its first block is the one cached above; its second differs: one more word before the template's end)
    assert _counters(app) == (64 + 33 + 33, 16 + 16 + 32)


async def test_shared_system_prompt_with_different_questions(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """Two questions after one system prompt share the blocks covering it (and the user header)."""
    # given a system prompt of 41 content tokens: 45 message tokens, plus the 3-token user header = 48 shared
    system = {"role": "system", "content": _words("s", 41)}
    one = [system, {"role": "user", "content": "What is the capital of France ?"}]
    two = [system, {"role": "user", "content": "Name a large river in Germany please ."}]
    # when both are asked
    await _send_chat(client, one)
    await _send_chat(client, two)
    # then the second hits the three full blocks of the shared part (48 tokens) out of its 60
    n_one, n_two = chat_prompt_token_count(one), chat_prompt_token_count(two)
    assert (n_one, n_two) == (48 + 7 + 1 + 3, 48 + 8 + 1 + 3)
    assert _counters(app) == (n_one + n_two, 48)


async def test_multi_turn_conversation_hits_the_previous_turns(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """Each turn of a conversation finds the full blocks of the previous turn's prompt cached."""
    system = {"role": "system", "content": _words("s", 20)}  # 24 tokens
    turn1 = [system, {"role": "user", "content": "What is the capital of France ?"}]  # + 11 + 3 = 38
    answer = (await _send_chat(client, turn1)).json()["choices"][0]["message"]["content"]
    assert answer == "Paris"
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And of Germany ?"}]
    await _send_chat(client, turn2)  # 24 + 11 + 5 + 8 + 3 = 51: hits turn 1's 2 full blocks (32)
    turn3 = [*turn2, {"role": "assistant", "content": "Berlin"}, {"role": "user", "content": "Thanks"}]
    await _send_chat(client, turn3)  # 51 - 3 + 5 + 5 + 3 = 61: hits turn 2's 3 full blocks (48)
    assert [chat_prompt_token_count(t) for t in (turn1, turn2, turn3)] == [38, 51, 61]
    assert _counters(app) == (38 + 51 + 61, 0 + 32 + 48)


async def test_same_block_after_a_different_prefix_does_not_hit(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """Block hashes are chained: an identical second block after a different first block is a miss."""
    app.config.prefix_cache_block_size = 4
    await client.post(COMPLETIONS, json={"model": "mock-chat", "prompt": "a b c d e f g h i", "max_tokens": 1})
    await client.post(COMPLETIONS, json={"model": "mock-chat", "prompt": "x y z w e f g h i", "max_tokens": 1})
    await client.post(COMPLETIONS, json={"model": "mock-chat", "prompt": "a b c d e f g h j", "max_tokens": 1})
    assert _counters(app) == (27, 0 + 0 + 8)


async def test_token_id_prompts_are_cached_too(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """Completions prompts given as token ids are looked up like text ones."""
    ids = list(range(100, 140))
    for _ in range(2):
        resp = await client.post(COMPLETIONS, json={"model": "mock-chat", "prompt": ids, "max_tokens": 1})
        assert resp.status_code == 200
    assert _counters(app) == (80, 32)


async def test_rejected_requests_are_not_counted(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """A request vLLM would reject before scheduling (400) or an injected failure queries nothing."""
    app.config.max_model_len = 20
    long_messages = [{"role": "user", "content": "x " * 30}]
    too_long = await client.post(CHAT, json={"model": "mock-chat", "messages": long_messages})
    assert too_long.status_code == 400
    app.config.fail_next = 1
    failed = await client.post(CHAT, json={"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]})
    assert failed.status_code == 500
    assert _counters(app) == (0, 0)


# ---------------------------------------------------------------------------------------------
# LRU eviction and configuration.
# ---------------------------------------------------------------------------------------------


async def test_lru_eviction_at_the_cap(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """At the cap the least recently used blocks go; a prompt used again is kept."""
    # given a cache of 4 blocks of 4 tokens, and three 9-token prompts of 2 full blocks each
    app.config.update({"prefix_cache_blocks": 4, "prefix_cache_block_size": 4})
    a, b, c = (_words(p, 9) for p in "abc")

    async def hits(prompt: str) -> int:
        before = app.stats.prefix_cache_hits_total
        resp = await client.post(COMPLETIONS, json={"model": "mock-chat", "prompt": prompt, "max_tokens": 1})
        assert resp.status_code == 200
        return app.stats.prefix_cache_hits_total - before

    # when A and B fill it, A is used again, then C arrives
    assert [await hits(a), await hits(b), await hits(a)] == [0, 0, 8]
    assert await hits(c) == 0
    # then B (least recently used) was evicted, A was kept, and the cache never outgrew its cap
    assert await hits(a) == 8
    assert await hits(b) == 0
    assert len(app.prefix_cache) == 4


def test_a_prompt_longer_than_the_cache_keeps_its_first_blocks() -> None:
    """Blocks are touched tail first (like vLLM frees them), so eviction keeps a prompt's prefix."""
    cache = PrefixCache(capacity=2, block_size=2)
    tokens = list(range(9))  # 4 full blocks
    assert cache.match_and_insert(tokens) == 0
    assert len(cache) == 2
    assert cache.match_and_insert(tokens) == 4  # the first two blocks survived


def test_disabled_and_resized_cache() -> None:
    """Capacity 0 caches nothing; a new block size empties the cache; a smaller capacity evicts."""
    cache = PrefixCache(capacity=0, block_size=4)
    assert cache.match_and_insert(list(range(20))) == 0 and len(cache) == 0
    cache.configure(8, 4)
    cache.match_and_insert(list(range(20)))
    assert len(cache) == 5
    cache.configure(3, 4)
    assert len(cache) == 3
    cache.configure(3, 2)
    assert len(cache) == 0 and cache.block_size == 2


async def test_config_endpoint_disables_and_reset_empties(client: httpx.AsyncClient, app: MockVLLM) -> None:
    """POST /mock/config prefix_cache_blocks=0 turns caching off (nothing counted); reset empties the cache."""
    messages = [{"role": "user", "content": _words("w", 40)}]
    await _send_chat(client, messages)
    assert len(app.prefix_cache) == 2
    app.reset()
    assert len(app.prefix_cache) == 0 and _counters(app) == (0, 0)
    resp = await client.post("/mock/config", json={"prefix_cache_blocks": 0})
    assert resp.json()["prefix_cache_blocks"] == 0
    await _send_chat(client, messages)
    await _send_chat(client, messages)
    assert _counters(app) == (0, 0)
    assert 'enable_prefix_caching="False"' in (await client.get("/metrics")).text


def test_cli_and_env_options() -> None:
    """The cache size, block size and prefill cost are CLI flags with MOCK_VLLM_* fallbacks."""
    args = build_parser().parse_args(["--prefix-cache-blocks", "8", "--prefill-ms-per-token", "1.5"])
    cfg = config_from_args(args, environ={"MOCK_VLLM_PREFIX_CACHE_BLOCK_SIZE": "128"})
    assert (cfg.prefix_cache_blocks, cfg.prefix_cache_block_size, cfg.prefill_ms_per_token) == (8, 128, 1.5)
    defaults = MockConfig()
    assert (defaults.prefix_cache_blocks, defaults.prefix_cache_block_size, defaults.prefill_ms_per_token) == (
        4096,
        16,
        0.0,
    )


# ---------------------------------------------------------------------------------------------
# Prefill delay: proportional to the uncached prompt tokens.
# ---------------------------------------------------------------------------------------------


async def test_prefill_delay_is_proportional_to_uncached_tokens(
    client: httpx.AsyncClient, app: MockVLLM, fake_sleep: FakeSleep
) -> None:
    """The wait before the first token is uncached tokens x prefill_ms_per_token (plus latency_s)."""
    # given 2 ms per uncached token and a 40-token prompt (2 full blocks cacheable)
    app.config.prefill_ms_per_token = 2.0
    messages = [{"role": "user", "content": _words("w", 33)}]
    # when it is sent cold, then warm (streamed), then warm with latency_s
    await _send_chat(client, messages)
    await _send_chat(client, messages, stream=True)
    app.config.latency_s = 0.5
    await _send_chat(client, messages, max_tokens=2)
    # then the cold request paid all 40 tokens, the warm ones only the 8 past the cached 32
    assert fake_sleep.delays == pytest.approx([40 * 0.002, 8 * 0.002, 0.5 + 8 * 0.002])


async def test_no_prefill_delay_by_default(client: httpx.AsyncClient, fake_sleep: FakeSleep) -> None:
    """With the defaults (prefill 0, latency 0) nothing waits before the first token."""
    await _send_chat(client, [{"role": "user", "content": _words("w", 40)}])
    await _send_chat(client, [{"role": "user", "content": _words("w", 40)}], stream=True)
    assert fake_sleep.delays == []


async def test_prefill_without_cache_charges_the_whole_prompt(
    client: httpx.AsyncClient, app: MockVLLM, fake_sleep: FakeSleep
) -> None:
    """With the prefix cache off every request pays for all its prompt tokens."""
    app.config.update({"prefix_cache_blocks": 0, "prefill_ms_per_token": 1.0})
    for _ in range(2):
        await client.post(COMPLETIONS, json={"model": "mock-chat", "prompt": _words("p", 50), "max_tokens": 1})
    assert fake_sleep.delays == pytest.approx([0.05, 0.05])


# ---------------------------------------------------------------------------------------------
# /metrics.
# ---------------------------------------------------------------------------------------------


async def test_metrics_expose_vllm_prefix_cache_counters(client: httpx.AsyncClient) -> None:
    """/metrics carries vLLM 0.32's prefix-cache families with their types, labels and values."""
    messages = [{"role": "user", "content": _words("w", 33)}]  # 40 tokens
    await _send_chat(client, messages)
    await _send_chat(client, messages)
    text = (await client.get("/metrics")).text
    labels = '{engine="0",model_name="mock-chat"}'
    for line in (
        "# TYPE vllm:prefix_cache_queries_total counter",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_queries_total{labels} 80.0",
        f"vllm:prefix_cache_hits_total{labels} 32.0",
        f"vllm:external_prefix_cache_queries_total{labels} 0.0",
        f"vllm:prompt_tokens_total{labels} 80.0",
        f"vllm:prompt_tokens_cached_total{labels} 32.0",
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="mock-chat",source="local_compute"} 48.0',
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="mock-chat",source="local_cache_hit"} 32.0',
        'vllm:prompt_tokens_cached_by_source_total{engine="0",model_name="mock-chat",source="device"} 32.0',
        'vllm:cache_config_info{block_size="16",enable_prefix_caching="True",engine="0",num_gpu_blocks="4096"} 1.0',
        f"vllm:num_requests_waiting{labels} 0.0",
        f"vllm:num_requests_running{labels} 0.0",
        f"vllm:kv_cache_usage_perc{labels} 0.0",
    ):
        assert line in text.splitlines(), line
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(families) == len(set(families))


# ---------------------------------------------------------------------------------------------
# stream_options.continuous_usage_stats.
# ---------------------------------------------------------------------------------------------


async def test_continuous_usage_in_every_chat_chunk(client: httpx.AsyncClient) -> None:
    """Every chunk carries usage after choices; completion_tokens counts that choice's tokens so far."""
    body = {
        "model": "mock-chat",
        "messages": [{"role": "user", "content": "hello"}],  # 8 prompt tokens
        "max_tokens": 3,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    resp = await client.post(CHAT, json=body)
    raw = [block for block in resp.text.split("\n\n") if block]
    events = _sse(resp.text)
    chunks, final, done = events[:-2], events[-2], events[-1]
    assert done == "[DONE]"
    seen = [(c["choices"][0]["index"], c["usage"]["completion_tokens"]) for c in chunks]
    assert seen == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
    for i, chunk in enumerate(chunks):
        usage = chunk["usage"]
        role_nulls = ["prompt_token_ids", "prompt_text"] if i < 2 else []  # the role chunks (n=2), as vLLM 0.32
        assert list(chunk) == ["id", "object", "created", "model", "choices", "usage", *role_nulls]
        assert list(usage) == ["prompt_tokens", "total_tokens", "completion_tokens", "completion_tokens_details"]
        assert usage["prompt_tokens"] == 8 and usage["total_tokens"] == 8 + usage["completion_tokens"]
    assert raw[2].endswith(
        ',"usage":{"prompt_tokens":8,"total_tokens":9,"completion_tokens":1,"completion_tokens_details":null}}'
    )
    assert final["choices"] == [] and final["usage"] == {"prompt_tokens": 8, "total_tokens": 14, "completion_tokens": 6}


async def test_continuous_usage_on_a_natural_stop_and_completions(client: httpx.AsyncClient) -> None:
    """The finish-only chunk repeats the choice's count; completions use each prompt's own count."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chat = {"model": "mock-chat", "messages": [{"role": "user", "content": "capital of France ?"}]}
    events = _sse((await client.post(CHAT, json={**chat, "stream": True, "stream_options": opts})).text)
    assert [(e["choices"][0].get("finish_reason"), e["usage"]["completion_tokens"]) for e in events[:-2]] == [
        (None, 0),
        (None, 1),
        ("stop", 1),
    ]
    batch = {"model": "mock-chat", "prompt": ["a b c", "d"], "max_tokens": 2, "stream": True, "stream_options": opts}
    events = _sse((await client.post(COMPLETIONS, json=batch)).text)
    usages = [(e["choices"][0]["index"], e["usage"]) for e in events[:-2]]
    assert usages == [
        (0, {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1}),
        (1, {"prompt_tokens": 1, "total_tokens": 2, "completion_tokens": 1}),
        (0, {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}),
        (1, {"prompt_tokens": 1, "total_tokens": 3, "completion_tokens": 2}),
    ]
    assert events[-2]["usage"] == {"prompt_tokens": 4, "total_tokens": 8, "completion_tokens": 4}


@pytest.mark.parametrize(
    "options", [{"continuous_usage_stats": True}, {"include_usage": False, "continuous_usage_stats": True}, None]
)
async def test_continuous_usage_needs_include_usage(client: httpx.AsyncClient, options: Any) -> None:
    """Like vLLM, continuous_usage_stats without include_usage adds no usage anywhere."""
    body: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update(stream=True, stream_options=options)
    events = _sse((await client.post(CHAT, json=body)).text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])


def test_the_cache_journals_what_vllm_would_publish() -> None:
    # given a cache of 4 blocks of 2 tokens that journals its changes
    cache = PrefixCache(4, 2)
    cache.journal = []
    # when a 5-token prompt is cached, then a prompt sharing its first block, then one that evicts
    cache.match_and_insert(["a", "b", "c", "d", "e"])
    cache.match_and_insert(["a", "b", "x", "y"])
    cache.match_and_insert(["p", "q", "r", "s"])
    first, second = cache.block_hashes(["a", "b", "c", "d"]), cache.block_hashes(["a", "b", "x", "y"])
    # then each run of new blocks is stored with its parent, and the evicted blocks are removed
    assert cache.journal[0] == ("stored", None, first, 0)
    assert cache.journal[1] == ("stored", first[0], second[1:], 1)
    assert cache.journal[2][0] == "stored" and cache.journal[3] == ("removed", [first[1]])  # the least recent
    cache.clear()
    assert cache.journal[-1] == ("cleared",)


async def test_kv_events_are_published_as_vllm_does() -> None:
    import zmq

    from backends.mock_vllm import chat_prompt_token_ids, free_port
    from routing.kv_events import BackendBlockIndex, block_keys, handle_message

    # given a mock publishing its KV-cache events, and a subscriber to the endpoint it announces
    port = free_port()
    app = MockVLLM(MockConfig(models=["m"]), kv_events_port=port)
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as client:
            sources = (await client.get("/kv_event_sources")).json()
            assert sources["0"]["endpoint"] == f"tcp://*:{port}" and sources["0"]["enable_kv_cache_events"] is True
            messages = [{"role": "user", "content": _words("w", 60)}]
            sub.connect(f"tcp://127.0.0.1:{port}")
            await asyncio.sleep(0.5)  # PUB drops what it sends before the subscription is connected
            # when a chat request is served
            await client.post(CHAT, json={"model": "m", "messages": messages, "max_tokens": 1})
            frames = sub.recv_multipart()
            # then the router's decoder reads it, and its blocks are those of the ids /tokenize gives
            index = BackendBlockIndex(max_blocks=1000)
            assert handle_message(index, frames)
            ids = (await client.post("/tokenize", json={"model": "m", "messages": messages})).json()["tokens"]
            keys = block_keys(ids, 16)
            assert ids == chat_prompt_token_ids(messages) and len(keys) == len(ids) // 16 > 0
            assert index.matched_blocks(keys) == len(keys) and index.block_size == 16
        # and without the setting there is nothing to subscribe to, as on vLLM
        plain = httpx.AsyncClient(transport=httpx.ASGITransport(app=MockVLLM()), base_url="http://mock")
        async with plain:
            assert (await plain.get("/kv_event_sources")).json() == {}
    finally:
        sub.close(linger=0)
        app.close()
