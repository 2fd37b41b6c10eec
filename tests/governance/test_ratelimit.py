"""Rate limits: exact RPM/TPM/daily budget, settlement to real usage, headers, Redis failure modes."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import httpx
import pytest
import redis

from governance.models import key_hash
from governance.ratelimit import LocalRateLimiter, RedisFailureMode, RedisRateLimiter
from governance.snapshot import KeySnap, KeySnapshot
from routing.errors import APIError
from routing.registry import RegistryCache
from tests.factories import backend_create, model_create, pool_create, registry_snap

REDIS_URL = os.environ.get("REDIS_URL", "")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL (a real Redis)")


def _key(**limits: int | None) -> KeySnap:
    return KeySnap(
        id=abs(hash(uuid.uuid4())) % 10**9,
        name="k",
        allowed_models=None,
        expires_at=None,
        rpm_limit=limits.get("rpm"),
        tpm_limit=limits.get("tpm"),
        daily_token_budget=limits.get("day"),
    )


class FixedClock:
    def __init__(self, now: float = 1_800_000_010.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_local_rpm_exact_and_headers() -> None:
    limiter, key = LocalRateLimiter(FixedClock()), _key(rpm=3)
    reservations = [await limiter.admit(key, 0) for _ in range(3)]
    assert dict(reservations[-1].headers())[b"x-ratelimit-remaining-requests"] == b"0"
    with pytest.raises(APIError) as exc:
        await limiter.admit(key, 0)
    assert exc.value.status == 429 and exc.value.code == "rate_limit_exceeded"
    headers = dict(exc.value.headers)
    assert headers[b"retry-after"] == b"50" and headers[b"x-ratelimit-limit-requests"] == b"3"


async def test_local_tpm_reserves_then_settles_to_real_usage() -> None:
    limiter, key = LocalRateLimiter(FixedClock()), _key(tpm=100)
    first = await limiter.admit(key, 80)  # prompt estimate + max_tokens
    with pytest.raises(APIError):
        await limiter.admit(key, 30)  # 80 + 30 > 100 while the first is reserved
    await limiter.settle(first, 12)  # it really used 12
    second = await limiter.admit(key, 30)
    assert second.tokens_used == 42


async def test_local_daily_budget() -> None:
    clock = FixedClock()
    limiter, key = LocalRateLimiter(clock), _key(day=50)
    await limiter.admit(key, 40)
    clock.now += 120  # another minute, same day
    with pytest.raises(APIError) as exc:
        await limiter.admit(key, 20)
    assert exc.value.code == "daily_budget_exceeded" and exc.value.type == "insufficient_quota"


async def test_gateway_answers_429_with_headers_and_limit_headers_on_success(make_gateway, mock_vllm) -> None:
    gateway = make_gateway(registry=registry_snap(), transport=httpx.ASGITransport(app=mock_vllm))
    gateway.keys = RegistryCache.static(KeySnapshot(1, {key_hash("sk-r"): _key(rpm=2, tpm=10_000)}))
    gateway.limiter = LocalRateLimiter(FixedClock())  # a minute window cannot roll over between the requests
    body = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway), base_url="http://r", headers={"Authorization": "Bearer sk-r"}
    ) as client:
        ok = await client.post("/v1/chat/completions", json=body)
        assert ok.status_code == 200
        for name in (
            "limit-requests",
            "remaining-requests",
            "limit-tokens",
            "remaining-tokens",
            "reset-requests",
            "reset-tokens",
        ):
            assert f"x-ratelimit-{name}" in ok.headers
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        limited = await client.post("/v1/chat/completions", json=body)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert gateway.usage.events[-1].status == 429


@pytest.mark.parametrize(("mode", "expected"), [("local", 200), ("open", 200), ("closed", 503)])
async def test_redis_unreachable_follows_the_documented_mode(make_gateway, mock_vllm, mode, expected) -> None:
    gateway = make_gateway(registry=registry_snap(), transport=httpx.ASGITransport(app=mock_vllm))
    gateway.keys = RegistryCache.static(KeySnapshot(1, {key_hash("sk-r"): _key(rpm=5)}))
    gateway.limiter = RedisRateLimiter("redis://127.0.0.1:1/0", failure_mode=RedisFailureMode(mode), timeout_s=0.2)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway), base_url="http://r", headers={"Authorization": "Bearer sk-r"}
    ) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]}
        )
    assert response.status_code == expected, response.text
    if mode == "closed":
        assert response.json()["error"]["code"] == "rate_limiter_unavailable"


def _wait_for_fresh_minute(margin_s: float = 8.0) -> None:
    """Fixed windows: start a counting test early in a minute so it cannot straddle two windows."""
    into = time.time() % 60
    if into > 60 - margin_s:
        time.sleep(60 - into + 0.1)


@pytest.mark.services
@needs_redis
async def test_redis_limiter_is_exact_under_concurrency_and_settles() -> None:
    _wait_for_fresh_minute()
    key = _key(rpm=10, tpm=10_000)
    limiters = [RedisRateLimiter(REDIS_URL, prefix=f"test:{uuid.uuid4().hex}:") for _ in range(2)]
    limiters[1].prefix = limiters[0].prefix  # two "processes", one Redis

    async def one(i: int) -> bool:
        try:
            reservation = await limiters[i % 2].admit(key, 100)
        except APIError:
            return False
        await limiters[i % 2].settle(reservation, 7)
        return True

    results = await asyncio.gather(*(one(i) for i in range(40)))
    assert sum(results) == 10
    client = redis.Redis.from_url(REDIS_URL)
    window = int(time.time() // 60)
    settled = client.get(f"{limiters[0].prefix}{key.id}:m:{window}:t")
    assert settled is not None and int(settled) == 70  # settled to 10 x 7


@pytest.mark.services
@needs_redis
@pytest.mark.django_db(transaction=True)
def test_two_platform_processes_admit_exactly_the_limit() -> None:
    from backends.mock_vllm import MockServer
    from governance.services import api_key_create
    from tests.conftest import MASTER_KEY
    from tests.live import PlatformProcess

    with MockServer(models=["served-chat"]) as mock:
        pool = pool_create()
        backend_create(pool=pool, base_url=mock.url)
        model_create(pool=pool, name="chat-model", served_name="served-chat")
        _, secret = api_key_create(name=f"exact-{uuid.uuid4().hex[:6]}", rpm_limit=12)
        env = {"REDIS_URL": REDIS_URL}
        with PlatformProcess(master_key=MASTER_KEY, env=env) as a, PlatformProcess(master_key=MASTER_KEY, env=env) as b:
            _wait_for_fresh_minute()

            async def burst() -> list[httpx.Response]:
                async with httpx.AsyncClient(headers={"Authorization": f"Bearer {secret}"}, timeout=10) as client:
                    body = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                    return await asyncio.gather(
                        *(client.post(f"{(a, b)[i % 2].url}/v1/chat/completions", json=body) for i in range(40))
                    )

            responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 12 and codes.count(429) == 28
    assert all("x-ratelimit-limit-requests" in r.headers for r in responses)
    assert mock.stats.total_requests == 12
