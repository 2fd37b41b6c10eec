"""Failover with a real vLLM pool: one server is stopped, the platform keeps answering, the probe notices.

It stops a server, so it only runs where `scripts/real_backend.sh` manages the pool (`E2E_CAN_KILL_BACKEND=1`,
set by `scripts/e2e.sh`), and it runs after every other E2E test (`E2E_RUN_LAST`). It restarts the server before
it ends, pass or fail.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import openai
import pytest

from tests.integration.conftest import CHAT_POOL, E2EConfig, E2ERegistry, LatencyLog
from tests.live import ROOT

pytestmark = pytest.mark.e2e
E2E_RUN_LAST = True

SCRIPT = ROOT / "scripts" / "real_backend.sh"
REQUESTS_WHILE_DOWN = 10


def _script(*args: str, timeout: float) -> None:
    """Run scripts/real_backend.sh with the given arguments; its output goes to the test's captured output."""
    subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, check=True, timeout=timeout)


@pytest.fixture
def victim(e2e_config: E2EConfig, e2e_registry: E2ERegistry) -> Iterator[tuple[str, int]]:
    """The pool's last backend (name, port), started again after the test whatever its outcome."""
    if not e2e_config.can_kill_backend:
        pytest.skip("E2E_CAN_KILL_BACKEND is not 1: the backends are not ours to stop (scripts/e2e.sh sets it)")
    if len(e2e_registry.backends) < 2:
        pytest.skip("failover needs a pool of at least two backends (VLLM_BACKEND_URL=url1,url2)")
    name, url = list(e2e_registry.backends.items())[-1]
    port = urlsplit(url).port
    assert port is not None, f"{url} has no explicit port for scripts/real_backend.sh stop-one"
    yield name, port
    _script("start", timeout=600)  # idempotent: only starts what is missing (~20 s for one chat server)


def _chat(client: openai.OpenAI, model: str) -> tuple[int, str]:
    """One short chat through the platform; returns (HTTP status, the backend that answered)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=8
    )
    raw.parse()
    return raw.status_code, raw.headers.get("x-router-backend", "")


def _probe_pool() -> dict[str, tuple[str, str]]:
    """Run the health probe service (what the admin action and the periodic task call) on the E2E pool."""
    from backends.models import Backend
    from backends.services import backend_probe_many

    backend_probe_many(backends=Backend.objects.filter(pool__name=CHAT_POOL))
    return {b.name: (b.status, b.last_error) for b in Backend.objects.filter(pool__name=CHAT_POOL)}


def test_pool_keeps_answering_when_a_backend_dies_and_the_probe_marks_it_unhealthy(
    client: openai.OpenAI,
    e2e_registry: E2ERegistry,
    latency: LatencyLog,
    victim: tuple[str, int],
    registry_db: None,
) -> None:
    killed, port = victim
    survivors = set(e2e_registry.backends) - {killed}
    # given every backend of the pool healthy
    assert {status for status, _ in _probe_pool().values()} == {"healthy"}
    # when one vLLM server is stopped
    _script("stop-one", str(port), timeout=60)
    # then sequential requests keep succeeding, answered by the others (connect errors are retried)
    answered = []
    for i in range(REQUESTS_WHILE_DOWN):
        with latency.measure(f"failover: {killed} down, request {i + 1}"):
            status, backend = _chat(client, e2e_registry.model)
        assert status == 200
        answered.append(backend)
    assert set(answered) <= survivors, answered
    # and the health probe marks the stopped server unhealthy in the registry, the others healthy
    health = _probe_pool()
    assert health[killed][0] == "unhealthy", health
    assert "unreachable" in health[killed][1], health
    assert all(health[name][0] == "healthy" for name in survivors), health

    # when the server is started again and probed
    _script("start", timeout=600)
    health = _probe_pool()
    assert {status for status, _ in health.values()} == {"healthy"}, health
    # then the platform sends it requests again (round robin, once the registry change is picked up)
    seen: set[str] = set()
    deadline = time.monotonic() + 10
    while killed not in seen and time.monotonic() < deadline:
        with latency.measure(f"failover: {killed} back"):
            status, backend = _chat(client, e2e_registry.model)
        assert status == 200
        seen.add(backend)
    assert killed in seen, seen
