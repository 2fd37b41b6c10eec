"""Faults across a real network (marker `faults`, `make faults`; needs root and `ip netns`).

Every backend and the Redis server run in network namespaces of their own, reached over veth pairs (10.200.N.2);
the platform (a uvicorn process, tests.live.PlatformProcess) runs on the host with a registry pointing at those
addresses. Faults are injected in the namespaces: a blackhole (iptables DROP: packets vanish, no reset), added
latency and loss (tc netem, or where the kernel has no netem a delaying relay plus iptables `statistic` loss), a
Redis partition under load, and a backend that stops reading in the middle of a large request.

Each test checks, from the client: requests fail over within the connect timeout, none outlives its deadline
(connect + read timeout + a margin; the client's own timeout is longer, so a hang fails the test), every answer
is a 200 or an OpenAI-shaped 5xx, and the successes the clients saw equal the requests the backends completed
(GET /mock/stats).
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from governance.services import api_key_create
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create
from tests.faults.netns import Netns, unavailable_reason, wait_http, wait_tcp
from tests.governance.test_ratelimit import _wait_for_fresh_minute
from tests.live import PlatformProcess

REASON = unavailable_reason()
pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(REASON is not None, reason=f"fault injection: {REASON}"),
    pytest.mark.django_db(transaction=True),
]

CONNECT_S = 1.0  # connect timeout of every backend in these tests
READ_S = 3.0  # read (and write) timeout
MARGIN_S = 1.5  # scheduling slack on a shared 2-core machine
DEADLINE_S = CONNECT_S + READ_S + MARGIN_S  # no request may take longer, whatever the fault
PORT = 8000
MODEL = "fx-chat"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass
class Outcome:
    status: int
    elapsed: float
    backend: str
    body: dict[str, Any]


def call(url: str, key: str = MASTER_KEY, body: dict[str, Any] = CHAT) -> Outcome:
    """One chat completion; the client waits DEADLINE_S + 5 s, so a request past its deadline fails, not hangs."""
    started = time.monotonic()
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=DEADLINE_S + 5,
    )
    elapsed = time.monotonic() - started
    try:
        payload = response.json()
    except ValueError:
        payload = {"raw": response.text[:200]}
    return Outcome(response.status_code, elapsed, response.headers.get("x-router-backend", ""), payload)


def assert_bounded(outcomes: list[Outcome], deadline_s: float = DEADLINE_S) -> None:
    """Every request ended before its deadline with a 200 or an OpenAI-shaped 5xx (or the limiter's 429)."""
    by_status: dict[int, list[float]] = {}
    for o in outcomes:
        by_status.setdefault(o.status, []).append(o.elapsed)
    summary = {status: (len(times), round(max(times), 2)) for status, times in sorted(by_status.items())}
    print(f"status: (count, slowest s) = {summary}, deadline {deadline_s} s")  # shown on failure, or with -s
    for o in outcomes:
        assert o.elapsed <= deadline_s, f"request took {o.elapsed:.2f} s > {deadline_s} s: {o}"
        if o.status == 200:
            assert o.body.get("choices"), o
        else:
            assert o.status >= 500 or o.status == 429, o
            error = o.body.get("error")
            assert isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error), o


def mock_stats(ns: Netns) -> dict[str, Any]:
    """The mock's request counters (GET /mock/stats), read over the veth pair."""
    return httpx.get(f"http://{ns.ip}:{PORT}/mock/stats", timeout=5).json()


def registry(*backends: tuple[str, Netns], read_s: float = READ_S) -> None:
    """Pool `fx` with one backend per namespace, serving MODEL (served-chat)."""
    pool = pool_create(name=f"fx-{uuid.uuid4().hex[:6]}")
    for name, ns in backends:
        backend_create(
            pool=pool,
            name=name,
            base_url=f"http://{ns.ip}:{PORT}",
            connect_timeout_s=CONNECT_S,
            read_timeout_s=read_s,
        )
    model_create(pool=pool, name=MODEL, served_name="served-chat")


def platform(**env: str) -> PlatformProcess:
    """The platform on the host side (no Redis unless given: the backend tests stay apart from the host's)."""
    return PlatformProcess(master_key=MASTER_KEY, env={"REDIS_URL": "", **env})


@pytest.fixture
def healthy(netns: Callable[[int], Netns]) -> Netns:
    """Namespace llmfx-1 with a healthy mock vLLM."""
    ns = netns(1)
    ns.spawn_mock(port=PORT)
    return ns


def test_a_blackholed_backend_fails_over_within_its_connect_timeout(
    netns: Callable[[int], Netns], healthy: Netns
) -> None:
    # given two backends, one of whose namespace drops every packet (no reset: connects just time out)
    dark = netns(2)
    dark.spawn_mock(port=PORT)
    registry(("fx-healthy", healthy), ("fx-dark", dark))
    dark.blackhole()
    with platform() as web:
        # when requests arrive one after another
        outcomes = [call(web.url) for _ in range(8)]
    # then every one is answered by the healthy backend, none later than the connect timeout + margin
    assert_bounded(outcomes, CONNECT_S + MARGIN_S)
    assert [o.status for o in outcomes] == [200] * 8
    assert {o.backend for o in outcomes} == {"fx-healthy"}
    # the blackhole was hit (some requests waited out the connect timeout, then failed over) ...
    waited = [o for o in outcomes if o.elapsed >= CONNECT_S * 0.9]
    assert 1 <= len(waited) <= 3, [round(o.elapsed, 2) for o in outcomes]  # 3 failures open the circuit
    # ... and the counts agree: the healthy backend completed exactly what the client got, the dark one nothing
    dark.heal()
    assert mock_stats(healthy)["completed_requests"] == 8
    assert mock_stats(dark)["total_requests"] == 0


def test_a_backend_blackholed_under_kept_alive_connections_ends_each_request_by_its_deadline(
    netns: Callable[[int], Netns], healthy: Netns
) -> None:
    # given two backends both serving, the router holding a kept-alive connection to each
    dark = netns(2)
    dark.spawn_mock(port=PORT)
    registry(("fx-healthy", healthy), ("fx-dark", dark))
    with platform() as web:
        warm = [call(web.url) for _ in range(4)]
        assert {o.backend for o in warm} == {"fx-healthy", "fx-dark"}
        # when one of them goes dark (packets dropped, no reset) and requests go on
        dark.blackhole()
        outcomes = [call(web.url) for _ in range(6)]
    # then a request written on the kept-alive connection waits out the read timeout (504; not retried, the
    # backend may have started it), later ones fail over within the connect timeout; none outlives its deadline
    assert_bounded(warm + outcomes)
    timed_out = [o for o in outcomes if o.status != 200]
    assert all(o.status == 504 and o.body["error"]["code"] == "backend_timeout" for o in timed_out), timed_out
    assert len(timed_out) <= 1, [(o.status, round(o.elapsed, 2)) for o in outcomes]
    assert all(o.backend == "fx-healthy" and o.elapsed <= CONNECT_S + MARGIN_S for o in outcomes if o.status == 200)
    dark.heal()
    completed = mock_stats(healthy)["completed_requests"] + mock_stats(dark)["completed_requests"]
    assert completed == sum(1 for o in warm + outcomes if o.status == 200)


def test_added_latency_and_loss_keep_every_request_bounded_and_counted(
    netns: Callable[[int], Netns], healthy: Netns
) -> None:
    # given a second backend 200 ms away (each way) on a link that loses 2 % of its packets
    slow = netns(2)
    if slow.netem("delay 200ms loss 2%"):
        slow.spawn_mock(port=PORT)
        min_slow_s = 0.2
    else:  # no sch_netem in this kernel: a relay in the namespace adds the delay, iptables the loss
        slow.spawn_mock(port=PORT + 1, host="127.0.0.1")
        relay = slow.spawn(
            sys.executable,
            "-m",
            "tests.faults.delay_relay",
            "--listen",
            f"{slow.ip}:{PORT}",
            "--target",
            f"127.0.0.1:{PORT + 1}",
            "--delay-ms",
            "200",
        )
        wait_http(f"http://{slow.ip}:{PORT}/health", relay)
        for chain in ("INPUT", "OUTPUT"):
            slow.iptables("-A", chain, "-m", "statistic", "--mode", "random", "--probability", "0.02", "-j", "DROP")
        min_slow_s = 0.4
    registry(("fx-healthy", healthy), ("fx-slow", slow), read_s=8.0)
    with platform() as web:
        # when 24 requests come 4 at a time
        with ThreadPoolExecutor(max_workers=4) as pool:
            outcomes = list(pool.map(lambda _: call(web.url), range(24)))
    # then each ends within connect + read timeout + margin, as a 200 or an OpenAI-shaped 5xx
    assert_bounded(outcomes, CONNECT_S + 8.0 + MARGIN_S)
    ok = [o for o in outcomes if o.status == 200]
    assert len(ok) >= 22, [(o.status, o.body) for o in outcomes if o.status != 200]
    # the slow backend served some of them, and they carry the added latency
    slow_ok = [o for o in ok if o.backend == "fx-slow"]
    assert slow_ok and all(o.elapsed >= min_slow_s for o in slow_ok), [round(o.elapsed, 2) for o in slow_ok]
    # and the successes the client saw are exactly the requests the backends completed
    slow.heal()
    completed = mock_stats(healthy)["completed_requests"] + mock_stats(slow)["completed_requests"]
    assert completed == len(ok)


def test_a_backend_that_stops_reading_mid_request_ends_within_the_write_timeout(
    netns: Callable[[int], Netns], healthy: Netns
) -> None:
    # given a backend that accepts connections and never reads (tiny receive buffer)
    stuck = netns(2)
    server = stuck.spawn(sys.executable, "-m", "tests.faults.stall_server", "--host", stuck.ip, "--port", str(PORT))
    wait_tcp(stuck.ip, PORT, server)
    registry(("fx-healthy", healthy), ("fx-stuck", stuck))
    # a 1.5 MB request: far more than the stalled backend's window, so the router's write stalls
    big = {**CHAT, "user": "x" * 1_500_000}
    with platform() as web:
        # when requests are sent one after another (round robin reaches the stuck backend)
        outcomes = [call(web.url, body=big) for _ in range(4)]
    # then every one ends before connect + write timeout + margin: a 200 or an OpenAI-shaped 5xx (not retried:
    # the backend may have started the work)
    assert_bounded(outcomes)
    failed = [o for o in outcomes if o.status != 200]
    assert failed, "no request reached the stuck backend"
    assert all(o.elapsed >= READ_S * 0.9 for o in failed), [round(o.elapsed, 2) for o in failed]
    ok = [o for o in outcomes if o.status == 200]
    assert {o.backend for o in ok} <= {"fx-healthy"}
    assert mock_stats(healthy)["completed_requests"] == len(ok)


@pytest.fixture
def redis_ns(netns: Callable[[int], Netns]) -> Iterator[Netns]:
    """Namespace llmfx-3 with a Redis server bound to its address (no persistence)."""
    if shutil.which("redis-server") is None:
        pytest.skip("fault injection: needs redis-server (apt-get install -y redis-server)")
    ns = netns(3)
    proc = ns.spawn(
        "redis-server", "--port", "6390", "--bind", ns.ip, "--save", "", "--appendonly", "no", "--protected-mode", "no"
    )
    wait_tcp(ns.ip, 6390, proc)
    yield ns


RPM = 5


@pytest.mark.parametrize("mode", ["local", "closed", "open"])
def test_a_redis_partition_under_load_follows_rate_limit_on_redis_error(
    mode: str, healthy: Netns, redis_ns: Netns
) -> None:
    # given the platform counting limits in a Redis in another namespace, a key of RPM requests a minute,
    # and a busy key (limit far away) sending requests all along
    registry(("fx-healthy", healthy))
    _, limited = api_key_create(name=f"fx-limited-{uuid.uuid4().hex[:6]}", rpm_limit=RPM)
    _, busy = api_key_create(name=f"fx-busy-{uuid.uuid4().hex[:6]}", rpm_limit=100_000)
    env = {"REDIS_URL": f"redis://{redis_ns.ip}:6390/0", "RATE_LIMIT_ON_REDIS_ERROR": mode}
    load: list[Outcome] = []
    partitioned = threading.Event()
    stop = threading.Event()
    with platform(**env) as web:
        _wait_for_fresh_minute(margin_s=15.0)  # the counted requests below fall in one fixed window

        def background() -> None:
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline and len(load) < 300:
                started_after = partitioned.is_set()
                outcome = call(web.url, busy)
                outcome.body["after_partition"] = started_after
                load.append(outcome)

        worker = threading.Thread(target=background)
        worker.start()
        try:
            before = [call(web.url, limited) for _ in range(2)]  # counted in Redis
            time.sleep(0.3)
            # when Redis is cut off mid-load (its packets dropped: every call waits out its timeout)
            redis_ns.blackhole()
            partitioned.set()
            after = [call(web.url, limited) for _ in range(RPM + 3)]
            time.sleep(0.5)
        finally:
            stop.set()
            worker.join(timeout=DEADLINE_S + 10)
        assert not worker.is_alive(), "the background load hung"
    # then no request outlived its deadline, and every answer has the right shape
    everything = before + after + load
    assert_bounded(everything)
    assert [o.status for o in before] == [200, 200]
    codes = [o.status for o in after]
    busy_after = [o.status for o in load if o.body.get("after_partition")]
    assert busy_after, "no load request ran during the partition"
    if mode == "local":
        # per-process counters take over: the key gets its RPM again (Redis's 2 are not known here), then 429
        assert codes == [200] * RPM + [429] * 3, codes
        assert set(busy_after) == {200}
    elif mode == "closed":
        # limited keys are refused while the limiter is unreachable
        assert set(codes) == {503}, codes
        assert {o.body["error"]["code"] for o in after} == {"rate_limiter_unavailable"}
        assert set(busy_after) == {503}
    else:
        # no limits while Redis is unreachable
        assert set(codes) == {200}, codes
        assert set(busy_after) == {200}
    # the successes every client saw are the requests the backend completed
    successes = sum(1 for o in everything if o.status == 200)
    assert mock_stats(healthy)["completed_requests"] == successes
