"""N platform processes on one PostgreSQL and one Redis behave as one system (marked `services`).

What is shared, and how:
- registry, health state, keys: PostgreSQL, reloaded by every process within ROUTER_REGISTRY_POLL_S of a change;
- rate limits: Redis (one Lua admission per request), exact across processes;
- runtime view (in-flight, circuits): each process keeps its own circuit breakers and publishes its view to Redis;
  /api/pools/ on any process shows the merged view (worst circuit, summed in-flight).
A process joining or leaving (behind a balancer that adds it when ready and removes it before SIGTERM) changes
nothing for clients.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from django.db import connection

from backends.mock_vllm import MockServer
from backends.services import backend_probe_all
from governance.services import api_key_create, api_key_revoke
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create
from tests.governance.test_ratelimit import _wait_for_fresh_minute
from tests.live import PlatformProcess

REDIS_URL = os.environ.get("REDIS_URL", "")
pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL (a real Redis)"),
    pytest.mark.django_db(transaction=True),
]
CHAT = {"model": "shared-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def postgres() -> None:
    """Skip unless the test database is PostgreSQL (the processes share it)."""
    if connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL on PostgreSQL")


@pytest.fixture
def backends(postgres: None) -> Iterator[tuple[MockServer, MockServer]]:
    """Pool `shared` of two mock vLLMs (`s-good`, `s-flaky`) serving `shared-chat`."""
    with MockServer(models=["served-chat"]) as good, MockServer(models=["served-chat"]) as flaky:
        pool = pool_create(name="shared")
        backend_create(pool=pool, name="s-good", base_url=good.url)
        backend_create(pool=pool, name="s-flaky", base_url=flaky.url)
        model_create(pool=pool, name="shared-chat", served_name="served-chat")
        yield good, flaky


def platform(**env: str) -> PlatformProcess:
    """A platform process on the test database and the shared Redis."""
    return PlatformProcess(master_key=MASTER_KEY, env={"REDIS_URL": REDIS_URL, **env})


def post(url: str, key: str = MASTER_KEY, body: dict[str, object] = CHAT) -> httpx.Response:
    """One chat completion through a process."""
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def eventually(predicate: Callable[[], bool], within_s: float = 2.0) -> bool:
    """Poll until the predicate holds or the time is up."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def served_by(url: str, n: int = 4) -> set[str]:
    """The backends that served n requests through a process."""
    return {post(url).headers.get("x-router-backend", "") for _ in range(n)}


def pool_view(url: str) -> dict[str, dict[str, object]]:
    """The backends of pool `shared` as /api/pools/ on that process shows them (merged runtime view)."""
    pools = httpx.get(f"{url}/api/pools/", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=10).json()
    return {b["name"]: b for p in pools if p["name"] == "shared" for b in p["backends"]}


def test_two_processes_behave_as_one_system(backends: tuple[MockServer, MockServer]) -> None:
    _, flaky = backends
    revocable, revocable_secret = api_key_create(name=f"revocable-{uuid.uuid4().hex[:6]}")
    limited, limited_secret = api_key_create(name=f"limited-{uuid.uuid4().hex[:6]}", rpm_limit=10)
    # counters are per key id, and a re-created test database reuses ids: start from zero
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(*client.keys(f"llm:rl:{limited.id}.*") or ["-"])
    with platform() as a, platform() as b:
        both = (a, b)

        # registry: a model added in the database is listed by both processes within 2 s
        model_create(pool=pool_create(name="other"), name="shared-new")

        def listed() -> bool:
            return all(
                "shared-new"
                in {
                    m["id"]
                    for m in httpx.get(f"{p.url}/v1/models", headers={"Authorization": f"Bearer {MASTER_KEY}"}).json()[
                        "data"
                    ]
                }
                for p in both
            )

        assert eventually(listed)

        # health: one probe run marks s-flaky unhealthy; both processes stop routing to it, then resume
        assert all(served_by(p.url) == {"s-good", "s-flaky"} for p in both)
        flaky.config.health_status = 503
        backend_probe_all()
        assert eventually(lambda: all(served_by(p.url) == {"s-good"} for p in both))
        flaky.config.health_status = 200
        backend_probe_all()
        assert eventually(lambda: all(served_by(p.url) == {"s-good", "s-flaky"} for p in both))

        # circuits: s-flaky answers 503; process A retries those requests on s-good (clients see 200) and opens
        # its own breaker; /api/pools/ on process B shows the circuit open (A's view merged through Redis)
        flaky.config.fail_status = 503
        assert all(post(a.url).status_code == 200 for _ in range(8))
        assert eventually(lambda: pool_view(b.url)["s-flaky"]["circuit"] == "open", within_s=5)
        assert pool_view(a.url)["s-flaky"]["circuit"] == "open"
        # B's own breaker is still closed: its first requests to s-flaky fail over too, unseen by clients
        assert all(post(b.url).status_code == 200 for _ in range(4))
        flaky.config.fail_status = None

        # key revocation: the key works on both, then is refused by both within 2 s
        assert [post(p.url, revocable_secret).status_code for p in both] == [200, 200]
        api_key_revoke(key=revocable)
        assert eventually(lambda: [post(p.url, revocable_secret).status_code for p in both] == [401, 401])

        # rate limits: 10 requests per minute for one key, exact across both processes under concurrency
        _wait_for_fresh_minute(margin_s=4.0)

        async def burst() -> list[int]:
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {limited_secret}"}, timeout=10) as client:
                responses = await asyncio.gather(
                    *(client.post(f"{both[i % 2].url}/v1/chat/completions", json=CHAT) for i in range(30))
                )
            return [r.status_code for r in responses]

        codes = asyncio.run(burst())
        assert codes.count(200) == 10 and codes.count(429) == 20


def test_a_third_process_joining_and_leaving_changes_nothing_for_clients(
    backends: tuple[MockServer, MockServer],
) -> None:
    _, key = api_key_create(name=f"loop-{uuid.uuid4().hex[:6]}")
    with platform() as a, platform() as b:
        live = [a.url, b.url]  # what a load balancer would route to
        statuses: list[int] = []
        by_url: dict[str, int] = {}
        in_flight: dict[str, int] = {}
        lock = threading.Lock()  # the balancer's view: picking a process and counting it in flight are one step
        stop = threading.Event()

        def loop() -> None:
            turn = itertools.count()
            deadline = time.monotonic() + 20  # bounded in time and count
            while not stop.is_set() and time.monotonic() < deadline and len(statuses) < 2000:
                with lock:
                    url = live[next(turn) % len(live)]
                    in_flight[url] = in_flight.get(url, 0) + 1
                try:
                    status = post(url, key).status_code
                except httpx.HTTPError:
                    status = -1
                finally:
                    with lock:
                        in_flight[url] -= 1
                statuses.append(status)
                by_url[url] = by_url.get(url, 0) + 1

        def drained(url: str) -> bool:
            with lock:
                return in_flight.get(url, 0) == 0

        client = threading.Thread(target=loop)
        client.start()
        try:
            time.sleep(0.3)
            # a third process joins: added to the balancer once it answers /readyz
            c = platform().start()
            with lock:
                live.append(c.url)
            time.sleep(0.8)
            # a stream starts on it, then it leaves: removed from the balancer, then SIGTERM
            body = {**CHAT, "stream": True, "max_tokens": 20}
            with httpx.stream(
                "POST",
                f"{c.url}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            ) as stream:
                with lock:
                    live.remove(c.url)
                # like a balancer's deregistration delay: the requests it already sent there finish first
                deadline = time.monotonic() + 10
                while not drained(c.url) and time.monotonic() < deadline:
                    time.sleep(0.01)
                c.proc.terminate()  # type: ignore[union-attr]
                lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
            c.stop()
            time.sleep(0.5)
        finally:
            stop.set()
            client.join()
    assert lines[-1] == "data: [DONE]"
    assert by_url.get(c.url, 0) > 0 and len(statuses) > 20
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
