"""Rerank, score, tokenize and detokenize through the gateway (ENDPOINTS + Lifecycle), against the in-process mock.

The official `openai` SDK has no method for these endpoints: its generic `client.post` is used for the /v1 paths
(what an SDK user would write), plain httpx for vLLM's paths outside /v1 (/rerank, /v2/rerank, /score, /tokenize,
/detokenize).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import httpx2
import openai
import pytest

from backends.mock_vllm import MockConfig, MockVLLM, token_ids
from backends.snapshot import ModelSnap
from governance.models import key_hash
from governance.ratelimit import LocalRateLimiter
from governance.snapshot import KeySnap, KeySnapshot
from routing.gateway import Gateway
from routing.registry import RegistryCache
from tests.conftest import AUTH, MASTER_KEY, usage_events
from tests.factories import backend_snap, registry_snap

CREATED = 1_700_000_000
DOCS = ["A kitten naps on the couch.", "Quarterly revenue grew by eight percent.", "The cat sleeps on the sofa."]
QUERY = "the cat on the sofa"


def _models() -> list[ModelSnap]:
    return [
        ModelSnap("chat-model", "served-chat", "chat", "p1", (), 2048, CREATED),
        ModelSnap("embed-model", "served-embed", "embedding", "p1", (), None, CREATED),
        ModelSnap("rerank-model", "served-rerank", "rerank", "p1", (), None, CREATED),
    ]


@pytest.fixture
def mock() -> MockVLLM:
    return MockVLLM(MockConfig(models=["served-chat"], embed_models=["served-embed"], rerank_models=["served-rerank"]))


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway], mock: MockVLLM) -> Gateway:
    return make_gateway(
        registry=registry_snap(backends=[backend_snap("b1")], models=_models()),
        transport=httpx.ASGITransport(app=mock),
    )


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway), base_url="http://router", headers=AUTH
    ) as client:
        yield client


@pytest.fixture
async def sdk(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    # the SDK's own HTTP library (httpx2 since openai 3), driving the gateway in-process
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gateway)) as http_client:
        yield openai.AsyncOpenAI(
            base_url="http://router/v1", api_key=MASTER_KEY, http_client=http_client, max_retries=0
        )


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    return dict(error)


# --- rerank ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["embed-model", "rerank-model"])
async def test_sdk_rerank_sorts_documents_by_relevance(sdk: openai.AsyncOpenAI, mock: MockVLLM, gateway, model) -> None:
    # when a client reranks three documents through the SDK's generic post on /v1/rerank
    body = await sdk.post("/rerank", body={"model": model, "query": QUERY, "documents": DOCS}, cast_to=object)
    # then every document comes back once, most relevant first, with its text and index, under the public name
    assert isinstance(body, dict)
    assert body["model"] == model
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["index"] == 2 and results[-1]["index"] == 1  # the sofa sentence first, the revenue one last
    assert all(r["document"]["text"] == DOCS[r["index"]] for r in results)
    # and the backend got vLLM's own path and the served name
    assert mock.stats.by_path.get("/rerank") == 1
    assert mock.stats.last_request["model"] == {"embed-model": "served-embed", "rerank-model": "served-rerank"}[model]
    # and the request is recorded with the backend's prompt tokens
    event = usage_events(gateway)[-1]
    assert (event.endpoint, event.model, event.status, event.code) == ("rerank", model, 200, None)
    assert event.prompt_tokens == body["usage"]["prompt_tokens"] > 0 and event.completion_tokens == 0


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank", "/v2/rerank/"])
async def test_every_rerank_alias_is_routed(http: httpx.AsyncClient, mock: MockVLLM, path: str) -> None:
    # when the request goes to any of vLLM's rerank paths, then it is served (not left to Django) with top_n applied
    response = await http.post(path, json={"model": "embed-model", "query": QUERY, "documents": DOCS, "top_n": 2})
    assert response.status_code == 200, response.text
    assert [r["index"] for r in response.json()["results"]] == [2, 0]
    assert mock.stats.by_path == {"/rerank": 1}
    # vLLM names the answer after the x-request-id the router sent: the id of the request's usage record
    assert response.json()["id"] == "score-" + response.headers["x-request-id"]


async def test_root_paths_are_served_before_the_django_fallback(make_gateway, mock: MockVLLM) -> None:
    # given a gateway whose fallback (Django) records what reaches it
    reached: list[str] = []

    async def fallback(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gateway = make_gateway(
        registry=registry_snap(backends=[backend_snap("b1")], models=_models()),
        transport=httpx.ASGITransport(app=mock),
    )
    gateway.fallback = fallback
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway), base_url="http://router", headers=AUTH
    ) as client:
        # when vLLM's non-/v1 paths are called, and one Django path
        tokenize = await client.post("/tokenize", json={"model": "chat-model", "prompt": "hi"})
        score = await client.post("/score", json={"model": "embed-model", "text_1": "a", "text_2": "b"})
        wrong_method = await client.get("/detokenize")
        admin = await client.get("/admin/")
    # then the gateway answers the former and Django only the latter
    assert (tokenize.status_code, score.status_code, admin.status_code) == (200, 200, 204)
    assert _error(wrong_method, 405)["code"] == "method_not_allowed"
    assert reached == ["/admin/"]


# --- score ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "pairs"),
    [
        ({"queries": QUERY, "documents": DOCS}, 3),  # 1:N
        ({"queries": [QUERY, QUERY], "items": DOCS[:2]}, 2),  # N:N under vLLM's other names
        ({"text_1": [QUERY], "text_2": DOCS[2]}, 1),  # 1:1
        ({"data_1": DOCS, "data_2": DOCS}, 3),
    ],
)
async def test_sdk_score_gives_one_score_per_pair_in_order(
    sdk: openai.AsyncOpenAI, mock: MockVLLM, fields, pairs
) -> None:
    body = await sdk.post("/score", body={"model": "rerank-model", **fields}, cast_to=object)
    assert isinstance(body, dict)
    assert body["model"] == "rerank-model" and body["object"] == "list"
    assert [d["index"] for d in body["data"]] == list(range(pairs))
    assert all(d["object"] == "score" and 0.0 <= d["score"] <= 1.0 + 1e-9 for d in body["data"])
    assert mock.stats.by_path == {"/score": 1} and mock.stats.last_request["model"] == "served-rerank"


async def test_score_of_a_text_with_itself_is_highest(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/score", json={"model": "embed-model", "queries": DOCS[0], "documents": DOCS})
    scores = [d["score"] for d in response.json()["data"]]
    assert scores[0] == max(scores) and scores[0] == pytest.approx(1.0)


# --- errors: bad input, unknown model, wrong kind -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/v1/rerank", {"model": "embed-model", "documents": DOCS}, "query", None),
        ("/v1/rerank", {"model": "embed-model", "query": QUERY}, "documents", None),
        ("/v1/rerank", {"model": "embed-model", "query": QUERY, "documents": []}, "documents", None),
        ("/v1/rerank", {"model": "embed-model", "query": QUERY, "documents": [1, 2]}, "documents", None),
        ("/v1/rerank", {"model": "embed-model", "query": QUERY, "documents": DOCS, "top_n": -1}, "top_n", None),
        ("/v1/rerank", {"query": QUERY, "documents": DOCS}, "model", None),
        (
            "/rerank",
            {"model": "embed-model", "query": QUERY, "documents": ["x"] * 3001},
            "documents",
            "array_above_max_length",
        ),
        ("/v1/score", {"model": "embed-model", "queries": QUERY}, "queries", None),
        ("/v1/score", {"model": "embed-model", "queries": ["a", "b"], "documents": ["a", "b", "c"]}, "documents", None),
        ("/score", {"model": "embed-model", "text_1": "a", "text_2": []}, "text_2", None),
        ("/tokenize", {"model": "chat-model"}, "prompt", None),
        (
            "/tokenize",
            {"model": "chat-model", "prompt": "a", "messages": [{"role": "user", "content": "a"}]},
            "prompt",
            None,
        ),
        (
            "/tokenize",
            {"model": "chat-model", "messages": [{"role": "nobody", "content": "a"}]},
            "messages[0].role",
            None,
        ),
        ("/tokenize", {"prompt": "a"}, "model", None),
        ("/detokenize", {"model": "chat-model", "tokens": [1, -2]}, "tokens", None),
        ("/detokenize", {"model": "chat-model", "tokens": [1, True]}, "tokens", None),
        ("/detokenize", {"model": "chat-model", "tokens": "1 2"}, "tokens", None),
    ],
)
async def test_bad_input_is_a_400_naming_the_parameter(http, mock: MockVLLM, path, body, param, code) -> None:
    error = _error(await http.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert mock.stats.total_requests == 0  # refused before any backend


async def test_a_text_over_the_character_limit_is_refused(make_gateway, mock: MockVLLM) -> None:
    from routing.serializers import RequestLimits

    gateway = make_gateway(
        registry=registry_snap(backends=[backend_snap("b1")], models=_models()),
        transport=httpx.ASGITransport(app=mock),
        limits=RequestLimits(max_text_chars=100, max_inputs=4),
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway), base_url="http://router", headers=AUTH
    ) as client:
        long_doc = await client.post(
            "/v1/rerank", json={"model": "embed-model", "query": "q", "documents": ["ok", "x" * 101]}
        )
        long_query = await client.post(
            "/v1/score", json={"model": "embed-model", "queries": "q" * 101, "documents": "d"}
        )
        many = await client.post("/v1/score", json={"model": "embed-model", "queries": "q", "documents": ["d"] * 5})
        at_limits = await client.post(
            "/v1/rerank", json={"model": "embed-model", "query": "q" * 100, "documents": ["d" * 100] * 4}
        )
    assert "at most 100 characters" in _error(long_doc, 400)["message"]
    assert _error(long_query, 400)["param"] == "queries"
    assert _error(many, 400)["code"] == "array_above_max_length"
    assert at_limits.status_code == 200, at_limits.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/rerank", {"model": "no-such-model", "query": "q", "documents": ["d"]}),
        ("/v2/rerank", {"model": "no-such-model", "query": "q", "documents": ["d"]}),
        ("/score", {"model": "no-such-model", "queries": "q", "documents": ["d"]}),
        ("/tokenize", {"model": "no-such-model", "prompt": "hi"}),
        ("/detokenize", {"model": "no-such-model", "tokens": [1]}),
    ],
)
async def test_unknown_model_is_a_404(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    error = _error(await http.post(path, json=body), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/rerank", {"model": "chat-model", "query": "q", "documents": ["d"]}),
        ("/rerank", {"model": "chat-model", "query": "q", "documents": ["d"]}),
        ("/v1/score", {"model": "chat-model", "queries": "q", "documents": ["d"]}),
        ("/v1/embeddings", {"model": "rerank-model", "input": "hi"}),
        ("/v1/chat/completions", {"model": "rerank-model", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "embed-model", "prompt": "hi"}),
    ],
)
async def test_wrong_model_kind_is_a_400(http: httpx.AsyncClient, mock: MockVLLM, path, body) -> None:
    error = _error(await http.post(path, json=body), 400)
    assert error["code"] == "model_not_supported" and error["param"] == "model"
    assert body["model"] in error["message"]
    assert mock.stats.total_requests == 0


async def test_sdk_raises_the_openai_errors(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        await sdk.post("/rerank", body={"model": "chat-model", "query": "q", "documents": ["d"]}, cast_to=object)
    assert wrong_kind.value.code == "model_not_supported"
    with pytest.raises(openai.NotFoundError):
        await sdk.post("/score", body={"model": "nope", "queries": "q", "documents": ["d"]}, cast_to=object)
    # the SDK's own embeddings method on a reranker: the same 400
    with pytest.raises(openai.BadRequestError):
        await sdk.embeddings.create(model="rerank-model", input="hi")


async def test_backend_errors_pass_through_in_openai_shape(http: httpx.AsyncClient, mock: MockVLLM) -> None:
    # vLLM's own 400 (here: a multimodal input for a text-only model) reaches the client as an OpenAI error
    body = {"model": "embed-model", "query": {"content": [{"type": "text", "text": "q"}]}, "documents": ["d"]}
    error = _error(await http.post("/v1/rerank", json=body), 400)
    assert "MultiModalParam" in error["message"]


# --- tokenize / detokenize ------------------------------------------------------------------------------------


async def test_tokenize_prompt_and_detokenize_round_trip(http: httpx.AsyncClient, mock: MockVLLM, gateway) -> None:
    tokenized = await http.post(
        "/tokenize", json={"model": "chat-model", "prompt": "Hello world", "return_token_strs": True}
    )
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    # vLLM's shape exactly: no `model` added by the router
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == token_ids("Hello world") and body["count"] == 2
    assert body["token_strs"] == ["Hello", "world"]
    assert mock.stats.last_request["model"] == "served-chat"
    detokenized = await http.post("/detokenize", json={"model": "chat-model", "tokens": body["tokens"]})
    assert detokenized.json() == {"prompt": "Hello world"}
    # both are recorded as requests with no tokens, and no missing-usage flag
    events = list(usage_events(gateway))[-2:]
    assert [(e.endpoint, e.status, e.prompt_tokens, e.completion_tokens, e.code) for e in events] == [
        ("tokenize", 200, 0, 0, None),
        ("detokenize", 200, 0, 0, None),
    ]


async def test_tokenize_messages_counts_the_chat_prompt(http: httpx.AsyncClient) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    tokenized = (await http.post("/tokenize", json={"model": "chat-model", "messages": messages})).json()
    chat = (await http.post("/v1/chat/completions", json={"model": "chat-model", "messages": messages})).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == chat["usage"]["prompt_tokens"]
    without_prompt = await http.post(
        "/tokenize", json={"model": "chat-model", "messages": messages, "add_generation_prompt": False}
    )
    assert without_prompt.json()["count"] < tokenized["count"]


async def test_tokenize_serves_every_model_kind(http: httpx.AsyncClient) -> None:
    for model in ("chat-model", "embed-model", "rerank-model"):
        response = await http.post("/tokenize", json={"model": model, "prompt": "a b c"})
        assert response.status_code == 200 and response.json()["count"] == 3, (model, response.text)


def _limited_key(**limits: int | None) -> KeySnap:
    return KeySnap(
        id=4242,
        name="tok",
        allowed_models=None,
        expires_at=None,
        rpm_limit=limits.get("rpm"),
        tpm_limit=limits.get("tpm"),
        daily_token_budget=limits.get("day"),
    )


async def test_tokenizer_is_exempt_from_token_limits_but_counts_as_a_request(gateway: Gateway) -> None:
    # given a key of 2 requests a minute, 5 tokens a minute and 5 a day
    gateway.keys = RegistryCache.static(KeySnapshot(1, {key_hash("sk-tok"): _limited_key(rpm=2, tpm=5, day=5)}))
    gateway.limiter = LocalRateLimiter(clock=lambda: 1_800_000_010.0)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway), base_url="http://r", headers={"Authorization": "Bearer sk-tok"}
    ) as client:
        # a rerank body of 100 bytes reserves more than 5 tokens: refused by the token limit (not counted)
        refused = await client.post("/v1/rerank", json={"model": "embed-model", "query": "q" * 50, "documents": ["d"]})
        # when the tokenizer is used, then no token is reserved: it passes while the token limit would refuse
        tokenized = await client.post("/tokenize", json={"model": "chat-model", "prompt": "word " * 200})
        detokenized = await client.post("/detokenize", json={"model": "chat-model", "tokens": [1, 2, 3]})
        # but each counts as a request: a third one in the minute is one too many
        third = await client.post("/tokenize", json={"model": "chat-model", "prompt": "hi"})
    assert "tokens per minute" in _error(refused, 429)["message"]
    assert tokenized.status_code == 200 and detokenized.status_code == 200, (tokenized.text, detokenized.text)
    assert tokenized.headers["x-ratelimit-remaining-requests"] == "1"
    assert "x-ratelimit-limit-tokens" not in tokenized.headers
    error = _error(third, 429)
    assert error["code"] == "rate_limit_exceeded" and "requests per minute" in error["message"]
    assert [e.prompt_tokens for e in usage_events(gateway) if e.endpoint == "tokenize"] == [0, 0]


async def test_pooling_requests_reserve_and_settle_tokens(gateway: Gateway) -> None:
    # given a key with a token limit, when it reranks, then the reservation is settled to the backend's usage
    gateway.keys = RegistryCache.static(KeySnapshot(1, {key_hash("sk-tok"): _limited_key(tpm=10_000)}))
    limiter = LocalRateLimiter(clock=lambda: 1_800_000_010.0)
    gateway.limiter = limiter
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway), base_url="http://r", headers={"Authorization": "Bearer sk-tok"}
    ) as client:
        first = await client.post("/v1/score", json={"model": "embed-model", "queries": QUERY, "documents": DOCS})
        second = await client.post("/v1/score", json={"model": "embed-model", "queries": QUERY, "documents": DOCS})
    assert first.status_code == second.status_code == 200
    used = first.json()["usage"]["prompt_tokens"]
    # the second admission saw the first settled to its usage, and reserved its own body / 4
    reserved = len(second.request.content) // 4
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 10_000 - used - reserved
    assert used != reserved  # else settling would not show
