"""The /v1 gateway in-process against the in-process mock vLLM: happy paths and model-name rewriting."""

from __future__ import annotations

import httpx

from tests.conftest import AUTH

CAPITAL = "In one word, can you provide me the capital of France?"


async def test_models_lists_enabled_models(gateway_client: tuple[httpx.AsyncClient, object]) -> None:
    client, _ = gateway_client
    response = await client.get("/v1/models", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["chat-model", "text-model", "embed-model"]


async def test_chat_rewrites_model_both_ways(gateway_client, mock_vllm) -> None:
    client, gateway = gateway_client
    response = await client.post(
        "/v1/chat/completions",
        headers=AUTH,
        json={"model": "chat-model", "messages": [{"role": "user", "content": CAPITAL}], "temperature": 0},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "chat-model"
    assert body["choices"][0]["message"]["content"] == "Paris"
    assert mock_vllm.stats.last_request["model"] == "served-chat"
    assert response.headers["x-router-backend"] == "b1"
    event = gateway.usage.events[-1]
    assert (event.prompt_tokens, event.completion_tokens) == (body["usage"]["prompt_tokens"], 1)


async def test_completions_and_embeddings(gateway_client, mock_vllm) -> None:
    client, _ = gateway_client
    text = await client.post("/v1/completions", headers=AUTH, json={"model": "text-model", "prompt": "Hello"})
    assert text.status_code == 200, text.text
    assert text.json()["model"] == "text-model"
    emb = await client.post("/v1/embeddings", headers=AUTH, json={"model": "embed-model", "input": ["a b", "c"]})
    assert emb.status_code == 200, emb.text
    assert emb.json()["model"] == "embed-model"
    assert len(emb.json()["data"]) == 2
    assert mock_vllm.stats.last_request["model"] == "served-embed"
