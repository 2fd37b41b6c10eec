"""Routing under load, measured: each strategy's request distribution, failover, recovery and drain.

    .venv/bin/python bench/routing_distribution.py [--requests 600] [--concurrency 16]

Starts three mock vLLM processes and one platform process (uvicorn, fresh SQLite, as `make run` does), then:
1. for each strategy, sets it on the pool through the management API and counts which backend served each
   of N requests (`x-router-backend`), with a scenario that shows what the strategy reacts to;
2. kills one mock in the middle of a load run: counts failed requests (must be 0: requests not yet answered
   are retried before any byte was sent), and how many requests the dead backend still received;
3. restarts it and measures how long until it serves again (circuit half-open trial, health probe);
4. drains a backend while streams run on it: the streams finish, new requests go elsewhere.
Prints a Markdown report (used in docs/routing.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
KEY = "routing-bench-key"
sys.path.insert(0, str(ROOT))

from backends.mock_vllm import free_port  # noqa: E402
from bench.stack import platform_env, start_mock, start_platform, wait_http  # noqa: E402
from core.procs import stop_process  # noqa: E402


class Mock:
    """A mock vLLM in its own process (so it can be killed)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_mock(self.port)
        wait_http(f"{self.url}/health")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def configure(self, **knobs: Any) -> None:
        httpx.post(f"{self.url}/mock/config", json=knobs, timeout=5).raise_for_status()


async def _load(
    base: str, n: int, concurrency: int, body: dict[str, Any] | None = None, bodies: list[dict[str, Any]] | None = None
) -> tuple[collections.Counter[str], int]:
    served: collections.Counter[str] = collections.Counter()
    errors = 0
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(bodies[i % len(bodies)] if bodies else body or {})

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while not queue.empty():
            item = queue.get_nowait()
            response = await client.post(f"{base}/v1/chat/completions", json=item)
            if response.status_code == 200:
                served[response.headers["x-router-backend"]] += 1
            else:
                errors += 1

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return served, errors


def _share(served: collections.Counter[str], names: list[str]) -> str:
    total = sum(served.values()) or 1
    return " / ".join(f"{served.get(n, 0)} ({served.get(n, 0) * 100 / total:.0f} %)" for n in names)


CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
NAMES = ["demo-mock-1", "demo-mock-2", "demo-mock-3"]


@dataclass
class Scenarios:
    """The measurements against one running platform (its URL and API) in front of the three mocks."""

    base: str
    api: httpx.Client
    mocks: list[Mock]
    n: int  # requests of a load run
    c: int  # its concurrency

    def load(self, n: int | None = None, c: int | None = None, **kwargs: Any) -> tuple[collections.Counter[str], int]:
        return asyncio.run(_load(self.base, n or self.n, c or self.c, **kwargs))

    def strategy(self, name: str) -> None:
        self.api.patch("/pools/demo/", json={"routing_strategy": name}).raise_for_status()
        time.sleep(1.2)  # the registry reload interval is 0.5 s

    def strategies(self) -> list[str]:
        """A table row per strategy: how it spread the requests in a scenario that shows what it reacts to."""
        lines = ["| strategy | scenario | demo-mock-1 / demo-mock-2 / demo-mock-3 | errors |", "|---|---|---|---|"]
        self.strategy("round_robin")
        served, errors = self.load(body=CHAT)
        lines.append(f"| round_robin | equal backends | {_share(served, NAMES)} | {errors} |")

        for i, weight in enumerate((1, 2, 3)):
            self.api.patch(f"/backends/{NAMES[i]}/", json={"weight": weight}).raise_for_status()
        self.strategy("weighted")
        served, errors = self.load(body=CHAT)
        lines.append(f"| weighted | weights 1 / 2 / 3 | {_share(served, NAMES)} | {errors} |")

        self.mocks[0].configure(latency_s=0.05)  # backend 1 is slow: its requests stay in flight longer
        self.strategy("least_outstanding")
        served, errors = self.load(body=CHAT)
        lines.append(
            f"| least_outstanding | demo-mock-1 answers in 50 ms, others at once | {_share(served, NAMES)} | {errors} |"
        )
        self.mocks[0].configure(latency_s=0.0)

        self.mocks[1].configure(num_requests_waiting=6, kv_cache_usage_perc=0.9)
        self.strategy("kv_cache_aware")
        time.sleep(2.5)  # one scrape of /metrics (every 2 s, in the background)
        served, errors = self.load(body=CHAT)
        lines.append(
            f"| kv_cache_aware | demo-mock-2 reports 6 waiting, KV cache 90 % | {_share(served, NAMES)} | {errors} |"
        )
        self.mocks[1].configure(num_requests_waiting=0, kv_cache_usage_perc=0.0)
        lines.append(self._session_affinity())
        return lines

    def _session_affinity(self) -> str:
        """30 users' requests: the spread, and whether every user stayed on one backend."""
        self.strategy("session_affinity")
        bodies = [{**CHAT, "user": f"user-{i % 30}"} for i in range(self.n)]
        served, errors = self.load(bodies=bodies)

        async def per_user() -> dict[str, set[str]]:
            seen: dict[str, set[str]] = collections.defaultdict(set)
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as client:
                for i in range(90):
                    r = await client.post(f"{self.base}/v1/chat/completions", json={**CHAT, "user": f"user-{i % 30}"})
                    seen[f"user-{i % 30}"].add(r.headers["x-router-backend"])
            return seen

        sticky = all(len(v) == 1 for v in asyncio.run(per_user()).values())
        return (
            f"| session_affinity | 30 users (`user` field) | {_share(served, NAMES)} | {errors} "
            f"(every user on one backend: {'yes' if sticky else 'NO'}) |"
        )

    def failover(self) -> list[str]:
        """Kill one backend mid-load (failed requests, where the next ones go), restart it (how long until back)."""
        self.strategy("round_robin")

        async def kill_midway() -> tuple[collections.Counter[str], int]:
            task = asyncio.create_task(_load(self.base, self.n, self.c, CHAT))
            await asyncio.sleep(0.3)
            self.mocks[2].kill()
            return await task

        before = time.monotonic()
        served, errors = asyncio.run(kill_midway())
        lines = [
            "",
            f"Kill `demo-mock-3` 0.3 s into a run of {self.n} requests at concurrency {self.c}: "
            f"**{errors} failed**; served {_share(served, NAMES)} in {time.monotonic() - before:.1f} s.",
        ]
        served_after, errors_after = self.load(60, 4, body=CHAT)
        lines.append(
            f"Next 60 requests: {_share(served_after, NAMES)}, {errors_after} failed "
            "(the dead backend is out of rotation: its circuit opened after 3 connect errors)."
        )
        self.mocks[2].start()
        t0 = time.monotonic()
        back = False
        while time.monotonic() - t0 < 15:
            served_back, _ = self.load(12, 3, body=CHAT)
            if served_back.get(NAMES[2]):
                back = True
                break
            time.sleep(0.2)
        lines.append(
            f"Restarted: `demo-mock-3` served again after {time.monotonic() - t0:.1f} s "
            f"(cool-down 2 s here, then one half-open trial)."
            if back
            else "Restarted: did NOT come back."
        )
        return lines

    def drain(self) -> list[str]:
        """Drain a backend while streams run on it: do its streams finish, where do new requests go."""
        for mock in self.mocks:
            mock.configure(token_delay_s=0.02)
        base, api = self.base, self.api

        async def drain_during_streams() -> tuple[int, int, collections.Counter[str]]:
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:

                async def one_stream() -> tuple[str, bool]:
                    body = {**CHAT, "max_tokens": 40, "stream": True}
                    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                        data = b"".join([x async for x in r.aiter_bytes()])
                        return r.headers["x-router-backend"], data.endswith(b"data: [DONE]\n\n")

                streams = [asyncio.create_task(one_stream()) for _ in range(9)]
                await asyncio.sleep(0.2)
                await asyncio.to_thread(api.post, f"/backends/{NAMES[0]}/drain/")
                await asyncio.sleep(1.0)
                after, _ = await _load(base, 60, 4, CHAT)
                results = await asyncio.gather(*streams)
            on_drained = [ok for backend, ok in results if backend == NAMES[0]]
            return len(on_drained), sum(on_drained), after

        total, finished, after = asyncio.run(drain_during_streams())
        return [
            "",
            f"Drain `demo-mock-1` while 9 streams run (40 tokens, 20 ms each): {finished} of its {total} "
            f"streams finished with `[DONE]`; the next 60 requests went to {_share(after, NAMES)}.",
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="routing-bench-"))
    env = platform_env(state, KEY, ROUTER_CIRCUIT_COOLDOWN_S="2", LOG_LEVEL="WARNING")
    mocks = [Mock(free_port()) for _ in range(3)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web: subprocess.Popen[bytes] | None = None
    lines: list[str] = []
    try:
        for mock in mocks:
            mock.start()
        web = start_platform(env, [mock.url for mock in mocks], port)
        api = httpx.Client(base_url=f"{base}/api", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        scenarios = Scenarios(base, api, mocks, args.requests, args.concurrency)
        lines += scenarios.strategies()
        lines += scenarios.failover()
        lines += scenarios.drain()
    finally:
        stop_process(web, 10)
        for mock in mocks:
            mock.kill()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
