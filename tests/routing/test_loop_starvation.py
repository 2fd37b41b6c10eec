"""Hostile request bodies must not starve a worker's event loop: /healthz keeps answering while they arrive.

The issue measured /healthz at 6.9 s behind one 4 MB body. The bodies here are sized so that validating them on
the loop takes well over 100 ms (0.2 to 0.5 s of CPU each with DRF on a loaded 2-core machine; before the fix
/healthz took up to 1.7 s in this test), while reading and parsing them does not (about 5 ms each).

The bounds are on starvation, not speed: the typical (median) /healthz answer under 100 ms (before the fix:
1.3 s), and none of them waiting two seconds or more. Not every answer under 100 ms: on a shared 2-core machine
(load average 15) /healthz alone, with no other traffic, took over 100 ms in about one 4-second window in three
(up to 340 ms), which says nothing about the code under test.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import orjson
import pytest

from tests.conftest import MASTER_KEY
from tests.live import PlatformProcess

pytestmark = pytest.mark.django_db(transaction=True)

TYPICAL_BOUND_S = 0.1
"""The issue's bound on /healthz latency while hostile bodies arrive, for the median answer."""
STARVED_S = 2.0
"""No /healthz answer may wait this long (the issue's stalls lasted 2.3 to 7 s; one answer in about 200 took 1.1 s
after the fix at load average 24 on 2 cores)."""
SEND_FOR_S = 3.0
SENDERS = 2

TOOL = {"type": "function", "function": {"name": "f"}}
TOOL_MESSAGE = {"role": "tool", "content": "ok", "tool_call_id": "c"}
BODIES = {
    # over the default limits: refused by their counts (before: validated by DRF on the loop, ~0.5 s each)
    "tools": orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL] * 10_000}),
    "messages": orjson.dumps({"model": "m", "messages": [TOOL_MESSAGE] * 12_000}),
    # within the limits but heavy to validate (no fast path for tool messages): validated in a worker thread, then
    # 404 for the unknown model
    "heavy": orjson.dumps({"model": "m", "messages": [TOOL_MESSAGE] * 4_000, "tools": [TOOL] * 256}),
}
EXPECTED = {"tools": 400, "messages": 400, "heavy": 404}


def test_healthz_stays_fast_while_hostile_bodies_arrive() -> None:
    # given a platform worker process (empty registry: every model is unknown)
    with PlatformProcess(master_key=MASTER_KEY) as platform:
        stop = threading.Event()
        answers: Counter[tuple[str, int]] = Counter()
        lock = threading.Lock()

        def send(names: list[str]) -> None:
            headers = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}
            with httpx.Client(base_url=platform.url, timeout=30) as client:
                i = 0
                while not stop.is_set():
                    name = names[i % len(names)]
                    i += 1
                    status = client.post("/v1/chat/completions", content=BODIES[name], headers=headers).status_code
                    with lock:
                        answers[(name, status)] += 1

        names = list(BODIES)
        senders = [threading.Thread(target=send, args=(names[k:] + names[:k],)) for k in range(SENDERS)]
        # when clients keep sending hostile bodies while /healthz is sampled every 50 ms
        samples: list[float] = []
        with httpx.Client(base_url=platform.url, timeout=30) as probe:
            probe.get("/healthz")  # connected before the bodies arrive
            for thread in senders:
                thread.start()
            try:
                time.sleep(0.2)
                deadline = time.monotonic() + SEND_FOR_S
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    assert probe.get("/healthz").status_code == 200
                    samples.append(time.perf_counter() - started)
                    time.sleep(0.05)
            finally:
                stop.set()
                for thread in senders:
                    thread.join(timeout=60)
    # then /healthz answered typically within 100 ms and never after a stall, and the bodies got their answers
    samples.sort()
    median = samples[len(samples) // 2]
    summary = f"{len(samples)} /healthz samples: median {median * 1e3:.0f} ms, slowest {samples[-3:]}"
    assert median < TYPICAL_BOUND_S, summary
    assert samples[-1] < STARVED_S, summary
    assert {name for name, _ in answers} == set(BODIES), answers
    assert all(status == EXPECTED[name] for name, status in answers), answers
