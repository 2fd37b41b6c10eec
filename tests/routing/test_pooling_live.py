"""Rerank, score, tokenize and detokenize through the real ASGI stack (uvicorn process, registry and usage in the
test database) in front of the mock vLLM on a real socket."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from backends.mock_vllm import MockServer
from governance.models import UsageRecord
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create
from tests.live import PlatformProcess

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def mock_server() -> Iterator[MockServer]:
    with MockServer(models=["served-chat"], embed_models=["served-embed"], rerank_models=["served-rerank"]) as server:
        yield server


def test_pooling_and_tokenizer_endpoints_in_a_live_process(mock_server: MockServer) -> None:
    # given a registry (in the database) with a chat, an embedding and a reranker model behind the mock
    pool = pool_create(name="pool-live")
    backend_create(pool=pool, name="mock-live", base_url=mock_server.url)
    model_create(pool=pool, name="chat-model", served_name="served-chat")
    model_create(pool=pool, name="embed-model", served_name="served-embed", kind="embedding")
    model_create(pool=pool, name="reranker", served_name="served-rerank", kind="rerank")
    with PlatformProcess(master_key=MASTER_KEY) as platform:
        client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=MASTER_KEY, max_retries=0)
        http = httpx.Client(base_url=platform.url, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=10)
        with http:
            # when the SDK reranks and scores through /v1, and vLLM's own paths are called with plain HTTP
            docs = ["revenue grew", "the cat sleeps on the sofa"]
            ranked = client.post(
                "/rerank", body={"model": "reranker", "query": "cat sofa", "documents": docs}, cast_to=object
            )
            scored = client.post(
                "/score", body={"model": "embed-model", "text_1": "cat", "text_2": docs}, cast_to=object
            )
            v2 = http.post("/v2/rerank", json={"model": "embed-model", "query": "cat", "documents": docs, "top_n": 1})
            tokens = http.post("/tokenize", json={"model": "chat-model", "prompt": "Hello world"}).json()["tokens"]
            text = http.post("/detokenize", json={"model": "reranker", "tokens": tokens}).json()
            with pytest.raises(openai.BadRequestError):  # an embedding endpoint with a cross-encoder
                client.embeddings.create(model="reranker", input="x")
            # then each answers in vLLM's shape under the public model name
            assert isinstance(ranked, dict) and isinstance(scored, dict)
            assert ranked["model"] == "reranker" and [r["index"] for r in ranked["results"]] == [1, 0]
            assert scored["model"] == "embed-model" and len(scored["data"]) == 2
            assert v2.status_code == 200 and [r["index"] for r in v2.json()["results"]] == [1]
            assert text == {"prompt": "Hello world"}
    # and every request is in the database's usage records, the tokenizer's with 0 tokens (flushed at shutdown)
    deadline = time.monotonic() + 5
    while UsageRecord.objects.count() < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    records = {(r.endpoint, r.model, r.status): r for r in UsageRecord.objects.all()}
    assert set(records) == {
        ("rerank", "reranker", 200),
        ("score", "embed-model", 200),
        ("rerank", "embed-model", 200),
        ("tokenize", "chat-model", 200),
        ("detokenize", "reranker", 200),
        ("embeddings", "", 400),  # refused before the model resolved: no model on the record, as for chat
    }
    assert records["rerank", "reranker", 200].prompt_tokens == ranked["usage"]["prompt_tokens"] > 0
    assert records["tokenize", "chat-model", 200].prompt_tokens == 0
    assert records["detokenize", "reranker", 200].completion_tokens == 0
