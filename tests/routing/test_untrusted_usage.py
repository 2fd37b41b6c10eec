"""Usage numbers from a backend are checked: bad ones (negative, strings, absurd) are flagged on the usage record
and never break the answer already sent (issue 14 item 3)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
import pytest

from governance.models import key_hash
from governance.ratelimit import LocalRateLimiter, Reservation
from governance.snapshot import KeySnap, KeySnapshot
from routing.exchange import MISSING_USAGE, UNTRUSTED_USAGE
from routing.gateway import Gateway
from routing.registry import RegistryCache
from tests.factories import registry_snap
from tests.routing.conftest import HostRouter

SECRET = "sk-usage"
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


class LyingBackend:
    """A backend that answers every request with the given usage object (JSON or SSE)."""

    def __init__(self, usage: Any) -> None:
        self.usage = usage

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        stream = orjson.loads(body).get("stream") is True
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        if not stream:
            payload = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [choice], "usage": self.usage})
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        chunk = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "ok"}}]}
        final = {"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": self.usage}
        events = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in (chunk, final)) + b"data: [DONE]\n\n"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": events})


class CountingLimiter(LocalRateLimiter):
    def __init__(self) -> None:
        super().__init__()
        self.settled: list[tuple[int, int]] = []

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        self.settled.append((reservation.reserved_tokens, actual_tokens))
        await super().settle(reservation, actual_tokens)


async def _call(gateway: Gateway, body: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    done = False

    async def receive() -> dict[str, Any]:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": orjson.dumps(body), "more_body": False}
        await asyncio.Event().wait()  # the client stays until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {SECRET}".encode())],
    }
    await gateway(scope, receive, send)
    return sent


BAD_USAGE = [
    {"prompt_tokens": -5, "completion_tokens": 3, "total_tokens": -2},
    {"prompt_tokens": "12", "completion_tokens": 3, "total_tokens": 15},
    {"prompt_tokens": 10, "completion_tokens": 10**12, "total_tokens": 10**12 + 10},
    {"prompt_tokens": 1.5, "completion_tokens": True, "total_tokens": 2},
    "lots",
]


@pytest.mark.parametrize("usage", BAD_USAGE, ids=["negative", "string", "absurd", "float-bool", "not-an-object"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_bad_usage_is_flagged_and_the_answer_stands(
    make_gateway: Callable[..., Gateway], usage: Any, stream: bool
) -> None:
    # given a key with limits and a backend that reports usage that cannot be trusted
    gateway = make_gateway(registry=registry_snap(), transport=HostRouter({"mock-a": LyingBackend(usage)}))
    key = KeySnap(
        id=3, name="k", allowed_models=None, expires_at=None, rpm_limit=100, tpm_limit=100_000, daily_token_budget=None
    )
    gateway.keys = RegistryCache.static(KeySnapshot(version=1, by_hash={key_hash(SECRET): key}))
    limiter = CountingLimiter()
    gateway.limiter = limiter
    # when a client asks
    sent = await _call(gateway, {**CHAT, "stream": stream})
    # then it gets one answer, a 200, never a second response
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [200]
    # and the usage record carries only trusted counts, flagged
    event = gateway.usage.events[-1]  # type: ignore[attr-defined]
    # (a usage that is not even an object is not found in a stream at all: recorded as missing)
    assert event.status == 200 and event.code in {UNTRUSTED_USAGE, MISSING_USAGE}
    assert event.code == UNTRUSTED_USAGE or (stream and usage == "lots")
    assert 0 <= event.prompt_tokens <= 10 and 0 <= event.completion_tokens <= 3
    # and the key is charged what was reserved (not the backend's numbers, not nothing)
    assert len(limiter.settled) == 1
    reserved, charged = limiter.settled[0]
    assert charged == reserved > 0
