"""The Responses API through the gateway (in process): ids that carry their backend, model names both ways, usage,
stored responses across gateway instances and backends, and every error in OpenAI's shape."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest

from backends.mock_vllm import MockConfig, MockVLLM
from governance.models import key_hash
from governance.ratelimit import LocalRateLimiter, Reservation, estimate_tokens_size
from governance.snapshot import KeySnap, KeySnapshot
from routing.auth import MASTER, Principal
from routing.gateway import Gateway
from routing.registry import RegistryCache
from routing.responses import (
    ResponsesRequestSerializer,
    StoredRef,
    decode_response_id,
    encode_response_id,
    fast_valid_responses,
)
from routing.serializers import validate_request
from routing.ws import WS_ENDPOINTS
from tests.conftest import AUTH, MASTER_KEY
from tests.factories import backend_snap, registry_snap
from tests.routing.conftest import HostRouter, assert_openai_error

CAPITAL = "In one word, can you provide me the capital of France?"
KEY_A, KEY_B = "sk-responses-a", "sk-responses-b"


def _key(key_id: int, name: str, **limits: Any) -> KeySnap:
    return KeySnap(
        id=key_id,
        name=name,
        allowed_models=None,
        expires_at=None,
        rpm_limit=limits.get("rpm_limit"),
        tpm_limit=limits.get("tpm_limit"),
        daily_token_budget=None,
    )


KEYS = KeySnapshot(version=1, by_hash={key_hash(KEY_A): _key(11, "a"), key_hash(KEY_B): _key(12, "b")})


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def mocks() -> dict[str, MockVLLM]:
    """Two in-process mock vLLMs (each its own in-memory response store)."""
    return {
        host: MockVLLM(MockConfig(models=["served-chat", "served-text"], embed_models=["served-embed"]))
        for host in ("mock-a", "mock-b")
    }


@pytest.fixture
def registry() -> Any:
    """Pool p1 with two backends (ids 501, 502), round robin."""
    return registry_snap(
        backends=[
            backend_snap("b1", base_url="http://mock-a", id=501),
            backend_snap("b2", base_url="http://mock-b", id=502),
        ]
    )


@pytest.fixture
def build(make_gateway: Callable[..., Gateway], mocks: dict[str, MockVLLM]) -> Callable[..., Gateway]:
    """A gateway over the two mocks, as one router process; call it twice for two processes."""

    def make(registry: Any) -> Gateway:
        gateway = make_gateway(registry=registry, transport=HostRouter(mocks))
        gateway.keys = RegistryCache.static(KEYS)
        return gateway

    return make


def _client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router")


def _stored_on(mocks: dict[str, MockVLLM]) -> dict[str, list[str]]:
    return {host: list(mock.responses.store) for host, mock in mocks.items()}


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        kind = next(line[len("event: ") :] for line in lines if line.startswith("event: "))
        data = next(line[len("data: ") :] for line in lines if line.startswith("data: "))
        out.append((kind, orjson.loads(data)))
    return out


# --- the id scheme -----------------------------------------------------------------------------------------------


def test_ids_round_trip_only_for_their_key(settings: Any) -> None:
    # given a stored response of key 11 on backend 501
    a = Principal(name="a", is_master=False, key=_key(11, "a"))
    b = Principal(name="b", is_master=False, key=_key(12, "b"))
    ref = StoredRef(501, "resp_" + "ab" * 16, "chat-model")
    public = encode_response_id(ref, a)
    assert public is not None and public.startswith("resp_") and "ab" * 16 not in public
    # then the same key decodes it (deterministically), any other key or the master key does not
    assert decode_response_id(public, a) == ref
    assert encode_response_id(ref, a) == public
    assert decode_response_id(public, b) is None
    assert decode_response_id(public, MASTER) is None
    # and a changed character, a truncation or an unrelated id is refused
    flipped = public[:-3] + ("A" if public[-3] != "A" else "B") + public[-2:]
    for forged in (flipped, public[:-4], "resp_" + "0" * 32, "resp_", "chatcmpl-1", "resp_!!!"):
        assert decode_response_id(forged, a) is None, forged
    # and vLLM ids of another form are carried as they are (a safe character set only)
    other = StoredRef(7, "resp-custom.1", "m")
    assert decode_response_id(encode_response_id(other, a), a) == other
    assert encode_response_id(StoredRef(7, "resp x/../", "m"), a) is None
    # and rotating SECRET_KEY (the old one kept in SECRET_KEY_FALLBACKS) keeps ids valid; dropping it does not
    old = settings.SECRET_KEY
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "rotated-" + old, [old]
    assert decode_response_id(public, a) == ref
    settings.SECRET_KEY_FALLBACKS = []
    assert decode_response_id(public, a) is None


def test_fast_check_accepts_only_what_the_serializer_accepts() -> None:
    bodies: list[dict[str, Any]] = [
        {"model": "m", "input": "hi"},
        {"model": "m", "input": [{"role": "user", "content": "hi"}], "instructions": "be brief", "stream": True},
        {"model": "m", "input": "hi", "max_output_tokens": 5, "temperature": 0, "top_p": 1, "store": False},
        {"model": "m", "input": "hi", "previous_response_id": "resp_x", "user": "u"},
        {"model": "m", "input": "hi", "max_output_tokens": 0},
        {"model": "m", "input": "hi", "temperature": 3},
        {"model": "m", "input": 5},
        {"model": "m"},
        {"model": " m", "input": "x"},
        {"model": "m", "input": [{"role": "robot", "content": "hi"}]},
        {"model": "m", "input": "hi", "previous_response_id": ""},
        {"model": "m", "input": "hi", "stream": "yes"},
        {"model": "m", "input": "a\x00b"},
    ]
    for body in bodies:
        try:
            validate_request(ResponsesRequestSerializer, dict(body))
            accepted = True
        except Exception:
            accepted = False
        assert not fast_valid_responses(dict(body)) or accepted, body


def test_reservation_counts_max_output_tokens() -> None:
    assert estimate_tokens_size(400, {"max_output_tokens": 50}) == 150


def test_responses_are_not_offered_over_the_websocket() -> None:
    assert "responses" not in WS_ENDPOINTS and "chat.completions" in WS_ENDPOINTS


# --- POST /v1/responses --------------------------------------------------------------------------------------------


async def test_create_json_rewrites_model_and_id_and_records_usage(
    build: Callable[..., Gateway], registry: Any, mocks: dict[str, MockVLLM]
) -> None:
    gateway = build(registry)
    async with _client(gateway) as client:
        response = await client.post(
            "/v1/responses", headers=_auth(KEY_A), json={"model": "chat-model", "input": CAPITAL, "temperature": 0}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    # the backend saw its served name and the id the router chose; the client sees the public ones
    ((host, ids),) = [(h, ids) for h, ids in _stored_on(mocks).items() if ids]
    sent = mocks[host].stats.last_request
    assert sent["model"] == "served-chat" and sent["request_id"] == ids[0]
    assert "stream_options" not in sent
    assert body["model"] == "chat-model"
    assert body["id"] != ids[0] and body["id"].startswith("resp_")
    assert body["output"][0]["content"][0]["text"] == "Paris"
    assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] == 1
    # and the usage record has the Responses API's counts
    event = gateway.usage.events[-1]  # type: ignore[attr-defined]
    assert (event.endpoint, event.status, event.model, event.code) == ("responses", 200, "chat-model", None)
    assert (event.prompt_tokens, event.completion_tokens) == (body["usage"]["input_tokens"], 1)


async def test_stream_passes_typed_events_with_public_names(
    build: Callable[..., Gateway], registry: Any, mocks: dict[str, MockVLLM]
) -> None:
    gateway = build(registry)
    async with _client(gateway) as client:
        response = await client.post(
            "/v1/responses",
            headers=_auth(KEY_A),
            json={"model": "chat-model", "input": "Tell me a story", "max_output_tokens": 4, "stream": True},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 4
    assert all(data["type"] == kind for kind, data in events)
    # every response object names the public model and the public id; vLLM's id appears nowhere
    (inner,) = [i for ids in _stored_on(mocks).values() for i in ids]
    assert inner not in response.text and "served-chat" not in response.text
    objects = [data["response"] for _, data in events if "response" in data]
    assert {o["model"] for o in objects} == {"chat-model"} and len({o["id"] for o in objects}) == 1
    completed = events[-1][1]["response"]
    assert completed["status"] == "incomplete" and completed["usage"]["output_tokens"] == 4
    event = gateway.usage.events[-1]  # type: ignore[attr-defined]
    assert (event.stream, event.status, event.code, event.completion_tokens) == (True, 200, None, 4)
    assert event.prompt_tokens == completed["usage"]["input_tokens"]


async def test_a_tool_named_usage_cannot_fake_the_streamed_usage(build: Callable[..., Gateway], registry: Any) -> None:
    # given a tool whose schema has an object property called "usage" (echoed in every response object)
    tool = {
        "type": "function",
        "name": "f",
        "parameters": {"type": "object", "properties": {"usage": {"input_tokens": 0, "output_tokens": 0}}},
    }
    gateway = build(registry)
    async with _client(gateway) as client:
        response = await client.post(
            "/v1/responses",
            headers=_auth(KEY_A),
            json={"model": "chat-model", "input": "Tell me", "max_output_tokens": 3, "stream": True, "tools": [tool]},
        )
    assert response.status_code == 200
    event = gateway.usage.events[-1]  # type: ignore[attr-defined]
    assert event.completion_tokens == 3 and event.prompt_tokens > 0


async def test_stored_response_is_reached_from_another_gateway_on_its_own_backend(
    build: Callable[..., Gateway], registry: Any, mocks: dict[str, MockVLLM]
) -> None:
    # given two router processes over the same two backends
    first, second = build(registry), build(registry)
    async with _client(first) as one, _client(second) as two:
        created = (
            await one.post("/v1/responses", headers=_auth(KEY_A), json={"model": "chat-model", "input": CAPITAL})
        ).json()
        (host,) = [h for h, ids in _stored_on(mocks).items() if ids]
        # when the other process retrieves it, twice (round robin would alternate backends)
        for _ in range(2):
            got = await two.get(f"/v1/responses/{created['id']}", headers=_auth(KEY_A))
            assert got.status_code == 200, got.text
            assert got.json()["id"] == created["id"] and got.json()["model"] == "chat-model"
            assert got.json()["output"] == created["output"]
        # and continues the conversation: the follow-up runs where the first turn is stored, with its history
        before = {h: m.stats.total_requests for h, m in mocks.items()}
        follow = await two.post(
            "/v1/responses",
            headers=_auth(KEY_A),
            json={"model": "chat-model", "input": "And of Italy?", "previous_response_id": created["id"]},
        )
        assert follow.status_code == 200, follow.text
        after = {h: m.stats.total_requests for h, m in mocks.items()}
        assert {h for h in mocks if after[h] != before[h]} == {host}
        assert mocks[host].stats.last_request["previous_response_id"] in mocks[host].responses.store
        assert follow.json()["previous_response_id"] == created["id"]
        assert follow.json()["usage"]["input_tokens"] > created["usage"]["input_tokens"]
        # and the follow-up's own id is retrievable from the first process
        again = await one.get(f"/v1/responses/{follow.json()['id']}", headers=_auth(KEY_A))
        assert again.json()["previous_response_id"] == created["id"]
    # retrievals are counted, charged nothing
    retrievals = [e for e in second.usage.events if e.endpoint == "responses.retrieve"]  # type: ignore[attr-defined]
    assert len(retrievals) == 2 and all(e.prompt_tokens == e.completion_tokens == 0 for e in retrievals)
    assert all(e.code is None and e.status == 200 for e in retrievals)


async def test_another_keys_and_forged_ids_are_not_found(build: Callable[..., Gateway], registry: Any) -> None:
    gateway = build(registry)
    async with _client(gateway) as client:
        created = (
            await client.post("/v1/responses", headers=_auth(KEY_A), json={"model": "chat-model", "input": "hi"})
        ).json()
        rid = created["id"]
        for key, path in ((KEY_B, rid), (MASTER_KEY, rid), (KEY_A, rid[:-2]), (KEY_A, "resp_" + "0" * 32)):
            error = assert_openai_error(
                await client.get(f"/v1/responses/{path}", headers=_auth(key)),
                404,
                type="invalid_request_error",
                param="response_id",
                code="response_not_found",
            )
            assert path in error["message"]
        follow = await client.post(
            "/v1/responses",
            headers=_auth(KEY_B),
            json={"model": "chat-model", "input": "more", "previous_response_id": rid},
        )
        assert_openai_error(
            follow, 404, type="invalid_request_error", param="previous_response_id", code="previous_response_not_found"
        )
        cancel = await client.post(f"/v1/responses/{rid}/cancel", headers=_auth(KEY_B))
        assert_openai_error(cancel, 404, type="invalid_request_error", param="response_id", code="response_not_found")
        assert (await client.get(f"/v1/responses/{rid}")).status_code == 401


async def test_a_removed_or_disabled_backend_is_gone_not_someone_elses_404(
    build: Callable[..., Gateway], registry: Any, mocks: dict[str, MockVLLM]
) -> None:
    first = build(registry)
    async with _client(first) as client:
        created = (
            await client.post("/v1/responses", headers=_auth(KEY_A), json={"model": "chat-model", "input": "hi"})
        ).json()
    (host,) = [h for h, ids in _stored_on(mocks).items() if ids]
    name = "b1" if host == "mock-a" else "b2"
    pool = registry.pools["p1"]
    kept = tuple(b for b in pool.backends if b.name != name)
    disabled = tuple(replace(b, state="disabled") if b.name == name else b for b in pool.backends)
    served = {h: m.stats.total_requests for h, m in mocks.items()}
    for backends, why in ((kept, "removed"), (disabled, "disabled")):
        changed = registry_snap(backends=list(backends), version=2)
        async with _client(build(changed)) as client:
            got = await client.get(f"/v1/responses/{created['id']}", headers=_auth(KEY_A))
            error = assert_openai_error(
                got, 410, type="invalid_request_error", param="response_id", code="response_gone"
            )
            assert why in error["message"]
            follow = await client.post(
                "/v1/responses",
                headers=_auth(KEY_A),
                json={"model": "chat-model", "input": "more", "previous_response_id": created["id"]},
            )
            assert_openai_error(
                follow, 410, type="invalid_request_error", param="previous_response_id", code="response_gone"
            )
    # nothing reached any backend
    assert {h: m.stats.total_requests for h, m in mocks.items()} == served


async def test_a_restarted_backend_answers_our_not_found_with_the_public_id(
    build: Callable[..., Gateway], registry: Any, mocks: dict[str, MockVLLM]
) -> None:
    gateway = build(registry)
    async with _client(gateway) as client:
        created = (
            await client.post("/v1/responses", headers=_auth(KEY_A), json={"model": "chat-model", "input": "hi"})
        ).json()
        for mock in mocks.values():
            mock.responses.reset()  # vLLM keeps its store in memory: a restart forgets it
        got = await client.get(f"/v1/responses/{created['id']}", headers=_auth(KEY_A))
        error = assert_openai_error(
            got, 404, type="invalid_request_error", param="response_id", code="response_not_found"
        )
        assert created["id"] in error["message"]
        follow = await client.post(
            "/v1/responses",
            headers=_auth(KEY_A),
            json={"model": "chat-model", "input": "more", "previous_response_id": created["id"]},
        )
        error = assert_openai_error(
            follow, 404, type="invalid_request_error", param="previous_response_id", code="previous_response_not_found"
        )
        assert created["id"] in error["message"]


async def test_request_errors_in_openai_shape(build: Callable[..., Gateway], registry: Any) -> None:
    gateway = build(registry)
    async with _client(gateway) as client:
        post = client.post
        assert_openai_error(
            await post("/v1/responses", headers=AUTH, json={"model": "chat-model"}),
            400,
            type="invalid_request_error",
            param="input",
            code=None,
        )
        assert_openai_error(
            await post("/v1/responses", headers=AUTH, json={"model": "chat-model", "input": [{"role": "robot"}]}),
            400,
            type="invalid_request_error",
            param="input[0].role",
            code=None,
        )
        assert_openai_error(
            await post(
                "/v1/responses", headers=AUTH, json={"model": "chat-model", "input": "x", "max_output_tokens": 0}
            ),
            400,
            type="invalid_request_error",
            param="max_output_tokens",
            code=None,
        )
        assert_openai_error(
            await post("/v1/responses", headers=AUTH, json={"model": "nope", "input": "x"}),
            404,
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
        assert_openai_error(
            await post("/v1/responses", headers=AUTH, json={"model": "embed-model", "input": "x"}),
            400,
            type="invalid_request_error",
            param="model",
            code="model_not_supported",
        )
        assert_openai_error(
            await post("/v1/responses", headers=AUTH, json={"model": "chat-model", "input": "x", "conversation": "c1"}),
            400,
            type="invalid_request_error",
            param="conversation",
            code=None,
        )
        many = [{"role": "user", "content": [{"type": "input_text", "text": "x"}] * 300}]
        assert_openai_error(
            await post("/v1/responses", headers=AUTH, json={"model": "chat-model", "input": many}),
            400,
            type="invalid_request_error",
            param="input[0].content",
            code="array_above_max_length",
        )
        created = (await post("/v1/responses", headers=AUTH, json={"model": "chat-model", "input": "hi"})).json()
        deleted = await client.delete(f"/v1/responses/{created['id']}", headers=AUTH)
        assert_openai_error(deleted, 405, type="invalid_request_error", param=None, code="method_not_allowed")
        items = await client.get(f"/v1/responses/{created['id']}/input_items", headers=AUTH)
        assert_openai_error(items, 404, type="invalid_request_error", param=None, code="unsupported_endpoint")
        # vLLM's own answer for cancelling a response that is not a background one, with our id in it
        cancel = await post(f"/v1/responses/{created['id']}/cancel", headers=AUTH)
        assert cancel.status_code == 400 and cancel.json()["error"]["param"] == "response_id"
        assert (await client.get("/v1/responses", headers=AUTH)).status_code == 405


async def test_background_response_is_cancelled_on_its_backend(
    build: Callable[..., Gateway], registry: Any, mocks: dict[str, MockVLLM]
) -> None:
    for mock in mocks.values():
        mock.config.token_delay_s = 0.05
    first, second = build(registry), build(registry)
    async with _client(first) as one, _client(second) as two:
        queued = await one.post(
            "/v1/responses",
            headers=_auth(KEY_A),
            json={"model": "chat-model", "input": "Tell me a story", "max_output_tokens": 50, "background": True},
        )
        assert queued.status_code == 200 and queued.json()["status"] == "queued"
        cancelled = await two.post(f"/v1/responses/{queued.json()['id']}/cancel", headers=_auth(KEY_A))
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled" and cancelled.json()["id"] == queued.json()["id"]
        got = await one.get(f"/v1/responses/{queued.json()['id']}", headers=_auth(KEY_A))
        assert got.json()["status"] == "cancelled"
    event = first.usage.events[0]  # type: ignore[attr-defined]
    assert event.endpoint == "responses" and event.code == "missing_usage"  # charged its reservation


async def test_background_stream_is_replayed_by_a_retrieval(build: Callable[..., Gateway], registry: Any) -> None:
    gateway = build(registry)
    async with _client(gateway) as client:
        streamed = await client.post(
            "/v1/responses",
            headers=_auth(KEY_A),
            json={"model": "chat-model", "input": "Tell", "max_output_tokens": 3, "background": True, "stream": True},
        )
        events = _events(streamed.text)
        rid = events[0][1]["response"]["id"]
        replay = await client.get(f"/v1/responses/{rid}?stream=true&starting_after=2", headers=_auth(KEY_A))
        assert replay.status_code == 200, replay.text
        replayed = _events(replay.text)
        assert [e[1]["sequence_number"] for e in replayed] == [e[1]["sequence_number"] for e in events[3:]]
        assert replayed[-1][1]["response"]["id"] == rid and replayed[-1][1]["response"]["model"] == "chat-model"
        bad = await client.get(f"/v1/responses/{rid}?stream=maybe", headers=_auth(KEY_A))
        assert_openai_error(bad, 400, type="invalid_request_error", param="stream", code=None)
    retrieval = gateway.usage.events[-2]  # type: ignore[attr-defined]
    assert retrieval.endpoint == "responses.retrieve" and retrieval.completion_tokens == 0 and retrieval.stream


class _CountingLimiter(LocalRateLimiter):
    def __init__(self) -> None:
        super().__init__()
        self.reserved: list[int] = []
        self.settled: list[int] = []

    async def admit(self, key: KeySnap, tokens: int) -> Reservation:
        self.reserved.append(tokens)
        return await super().admit(key, tokens)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        self.settled.append(actual_tokens)
        await super().settle(reservation, actual_tokens)


async def test_limits_reserve_max_output_tokens_and_settle_the_real_usage(
    build: Callable[..., Gateway], registry: Any
) -> None:
    gateway = build(registry)
    limited = _key(13, "limited", tpm_limit=100_000, rpm_limit=100)
    gateway.keys = RegistryCache.static(KeySnapshot(version=2, by_hash={key_hash("sk-limited"): limited}))
    limiter = _CountingLimiter()
    gateway.limiter = limiter
    async with _client(gateway) as client:
        body = {"model": "chat-model", "input": CAPITAL, "max_output_tokens": 40}
        answer = await client.post("/v1/responses", headers=_auth("sk-limited"), json=body)
        got = await client.get(f"/v1/responses/{answer.json()['id']}", headers=_auth("sk-limited"))
    assert got.status_code == 200 and "x-ratelimit-remaining-requests" in got.headers
    usage = answer.json()["usage"]
    assert limiter.reserved[0] >= 40 and limiter.settled == [usage["input_tokens"] + usage["output_tokens"], 0]


async def test_concurrent_streams_each_get_their_own_ids(build: Callable[..., Gateway], registry: Any) -> None:
    gateway = build(registry)
    async with _client(gateway) as client:
        bodies = [{"model": "chat-model", "input": f"n {i}", "max_output_tokens": 2, "stream": True} for i in range(6)]
        answers = await asyncio.gather(*(client.post("/v1/responses", headers=_auth(KEY_A), json=b) for b in bodies))
        ids = [_events(a.text)[-1][1]["response"]["id"] for a in answers]
        assert len(set(ids)) == 6
        for rid in ids:
            assert (await client.get(f"/v1/responses/{rid}", headers=_auth(KEY_A))).status_code == 200
