"""/v1/ws before authentication: small frames only, a bounded wait, and a bounded number of such sockets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from channels.testing import WebsocketCommunicator

from routing.gateway import Gateway
from routing.ws import CLOSE_TOO_BIG, CLOSE_UNAUTHORIZED, websocket_application
from tests.conftest import MASTER_KEY

AUTH_HEADERS = [(b"authorization", f"Bearer {MASTER_KEY}".encode())]


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    """A gateway over the default registry (no request in these tests reaches a backend)."""
    return make_gateway()


async def connect(app: Any, headers: list[tuple[bytes, bytes]] | None = None) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(app, "/v1/ws", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


@pytest.mark.parametrize("frame", [{"text_data": "x" * 9000}, {"bytes_data": b"\x00" * 9000}])
async def test_a_large_frame_before_auth_closes_1009(gateway: Gateway, frame: dict[str, Any]) -> None:
    # given an unauthenticated socket; when it sends a frame over the pre-auth limit (8 KiB by default)
    ws = await connect(websocket_application(gateway))
    await ws.send_to(**frame)
    # then it is told why (OpenAI's error shape) and closed with 1009 (message too big)
    error = await ws.receive_json_from()
    assert (error["type"], error["status"], error["error"]["code"]) == ("error", 413, "request_too_large")
    closed = await ws.receive_output()
    assert (closed["type"], closed["code"]) == ("websocket.close", CLOSE_TOO_BIG)
    await ws.disconnect()


async def test_a_large_frame_after_auth_is_a_request(gateway: Gateway) -> None:
    # given a socket authenticated by its first message; when it sends a 20 KB request (an unknown model)
    ws = await connect(websocket_application(gateway))
    await ws.send_json_to({"type": "auth", "api_key": MASTER_KEY})
    assert (await ws.receive_json_from())["type"] == "authenticated"
    body = {"model": "nope", "messages": [{"role": "user", "content": "x" * 20_000}]}
    await ws.send_json_to({"type": "request", "id": 1, "endpoint": "chat.completions", "body": body})
    # then it is served as a request (here: 404 for the model), not refused for its size
    error = await ws.receive_json_from()
    assert (error["id"], error["status"], error["error"]["code"]) == (1, 404, "model_not_found")
    await ws.disconnect()


async def test_small_frames_before_auth_keep_the_socket(gateway: Gateway) -> None:
    # given an unauthenticated socket; when it sends a request under the limit before its auth message
    ws = await connect(websocket_application(gateway))
    await ws.send_json_to({"type": "request", "id": "early", "endpoint": "chat.completions", "body": {}})
    # then it gets a 401 for it and may still authenticate
    assert (await ws.receive_json_from())["status"] == 401
    await ws.send_json_to({"type": "auth", "api_key": MASTER_KEY})
    assert (await ws.receive_json_from())["type"] == "authenticated"
    await ws.disconnect()


async def test_the_auth_timeout_comes_from_settings(gateway: Gateway, settings: Any) -> None:
    # given ROUTER_WS_AUTH_TIMEOUT_S; when a socket never authenticates
    settings.ROUTER_WS_AUTH_TIMEOUT_S = 0.05
    ws = await connect(websocket_application(gateway))
    # then it is closed after that long
    assert (await ws.receive_json_from(timeout=2))["status"] == 401
    assert (await ws.receive_output(timeout=2))["code"] == CLOSE_UNAUTHORIZED
    await ws.disconnect()


def test_default_pre_auth_bounds(settings: Any) -> None:
    # the documented defaults (docs/security.md "Client limits", .env.example)
    defaults = (settings.ROUTER_WS_AUTH_TIMEOUT_S, settings.ROUTER_WS_PREAUTH_MAX_BYTES, settings.ROUTER_WS_MAX_PENDING)
    assert defaults == (5.0, 8192, 64)


async def test_pending_sockets_are_bounded(gateway: Gateway) -> None:
    # given an application allowing 2 unauthenticated sockets at once, both taken
    app = websocket_application(gateway, max_pending=2)
    first, second = await connect(app), await connect(app)
    # when a third client connects without a key; then its handshake is refused
    third = WebsocketCommunicator(app, "/v1/ws")
    assert (await third.connect())[0] is False
    # while a client with a key in its handshake is still accepted (it waits for nobody)
    keyed = await connect(app, AUTH_HEADERS)
    # and once one pending socket authenticates and the other leaves, two new ones fit again
    await first.send_json_to({"type": "auth", "api_key": MASTER_KEY})
    assert (await first.receive_json_from())["type"] == "authenticated"
    await second.disconnect()
    fourth, fifth = await connect(app), await connect(app)
    assert (await WebsocketCommunicator(app, "/v1/ws").connect())[0] is False
    for ws in (first, keyed, fourth, fifth):
        await ws.disconnect()


async def test_rejected_and_timed_out_sockets_free_their_slot(gateway: Gateway) -> None:
    # given one pending slot; when its socket fails to authenticate, or times out
    app = websocket_application(gateway, max_pending=1, auth_timeout_s=0.05)
    bad = await connect(app)
    await bad.send_json_to({"type": "auth", "api_key": "wrong"})
    assert (await bad.receive_json_from())["status"] == 401
    assert (await bad.receive_output())["code"] == CLOSE_UNAUTHORIZED
    # then the slot is free again at once (before the server reports the close)
    slow = await connect(app)
    assert (await slow.receive_json_from(timeout=2))["status"] == 401
    assert (await slow.receive_output(timeout=2))["code"] == CLOSE_UNAUTHORIZED
    last = await connect(app)
    for ws in (bad, slow, last):
        await ws.disconnect()


async def test_refusal_is_a_503_when_the_server_can_answer_http(gateway: Gateway) -> None:
    # given a full application and a server offering the WebSocket denial response (uvicorn does)
    app = websocket_application(gateway, max_pending=1)
    pending = await connect(app)
    scope = {"type": "websocket", "path": "/v1/ws", "headers": [], "extensions": {"websocket.http.response": {}}}
    refused = ApplicationCommunicator(app, scope)
    # when another unauthenticated client connects
    await refused.send_input({"type": "websocket.connect"})
    start = await refused.receive_output()
    body = await refused.receive_output()
    # then it gets 503 with Retry-After and an OpenAI-shaped error
    assert (start["type"], start["status"]) == ("websocket.http.response.start", 503)
    assert (b"retry-after", b"1") in start["headers"]
    assert b'"code":"too_many_pending_sockets"' in body["body"]
    await refused.send_input({"type": "websocket.disconnect", "code": 1006})
    await refused.wait(timeout=1)
    await pending.disconnect()
