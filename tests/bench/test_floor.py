"""bench/floor.py's featureless proxy forwards a chat completion to a real (mock) engine and back."""

from __future__ import annotations

import asyncio

import httpx
import orjson

from backends.mock_vllm import MockServer
from bench.floor import MODEL, AsgiFloor, FloorProtocol
from routing.upstream import FastUpstream


async def proxy_once(json_work: bool, model: str) -> httpx.Response:
    with MockServer(models=[MODEL]) as mock:
        upstream = FastUpstream()
        loop = asyncio.get_running_loop()
        url = f"{mock.url}/v1/chat/completions"
        server = await loop.create_server(lambda: FloorProtocol(upstream, url, json_work), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        try:
            async with httpx.AsyncClient() as client:
                first = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                second = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)  # keep-alive
            assert second.status_code == 200
            return first
        finally:
            server.close()
            await upstream.aclose()


async def test_the_floor_proxy_relays_the_engine_answer() -> None:
    # given the featureless floor proxy in front of a mock engine
    # when a chat completion is sent twice on one connection
    response = await proxy_once(json_work=False, model=MODEL)
    # then the engine's answer comes back as it was
    assert response.status_code == 200
    assert orjson.loads(response.content)["object"] == "chat.completion"


async def test_the_json_floor_rewrites_the_model_both_ways() -> None:
    # given the floor with the minimum JSON work, and a client naming a model the engine does not serve
    # when a chat completion is sent
    response = await proxy_once(json_work=True, model="public-name")
    # then the engine was asked for its own model and the client sees the name it asked for
    answer = orjson.loads(response.content)
    assert response.status_code == 200 and answer["model"] == "public-name"
    assert answer["usage"]["completion_tokens"] > 0


async def test_the_asgi_floor_does_the_same_json_work_as_an_asgi_app() -> None:
    # given the ASGI floor (the server-layer comparison) pointed at a mock engine
    with MockServer(models=[MODEL]) as mock:
        app = AsgiFloor()
        app.url = f"{mock.url}/v1/chat/completions"
        body = {"model": "public-name", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        # when a chat completion goes through it
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://floor") as client:
                response = await client.post("/v1/chat/completions", json=body)
        finally:
            assert app.upstream is not None
            await app.upstream.aclose()
    # then the engine answered and the client sees the model name it asked for, with the body's length
    answer = orjson.loads(response.content)
    assert response.status_code == 200 and answer["model"] == "public-name"
    assert int(response.headers["content-length"]) == len(response.content)
