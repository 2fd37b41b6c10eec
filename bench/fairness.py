"""Fair admission under overload: priority classes and fairness between keys in a full pool (issue 17).

    .venv/bin/python bench/fairness.py [--seconds 40] [--slots 8] [--strict] [--out bench/results/fairness.json]
                                                                        (also run by `make bench`)

Starts the mock vLLM and one platform process (uvicorn, fresh SQLite) whose one backend takes `--slots` requests at
a time (`max_concurrent_requests`) with the admission queue on (ROUTER_QUEUE_MAX 32, ROUTER_QUEUE_TIMEOUT_S 10), and
API keys made with `manage.py create_api_key --priority/--max-priority`. Service times come from the mock's
per-token delay (40 ms a token, no prefill delay): an interactive request asks for 50 tokens (2.0 s), a flooding one
for 5 to 25 (0.2 to 1.0 s, 0.6 s on average, so the slots do not free up in lockstep). The capacity is thus
slots / 0.6 s (8 slots: about 13 requests per second; a flood at 10x is 133 requests per second, which one platform
process on a loaded 2-core machine refuses without starving its event loop). Clients are open-loop (requests sent
at a fixed rate whatever the answers, on keep-alive connections, by a small asyncio + httptools client), so a flood
really is 10x capacity.

1. **unloaded**: the interactive key alone, at 0.1x capacity: its p50 / p99 latency.
2. **(a) flooded**: the same interactive key while a second key of the same class floods at 10x capacity: the
   interactive key's p50 / p99 against its unloaded figures and its errors; what the flooder got (answers, 429s and
   how fast they came).
3. **(b) two floods**: two keys of equal weight flooding at 5x capacity each: their shares of the answers.
4. **(c) three classes**: a `critical` key at 0.25x capacity, a `standard` key at 0.4x and a `batch` key flooding at
   10x: each class's latency and errors, and what was left for batch.

Targets (issue 17): the interactive key's p99 within 1.5x its unloaded p99 and no errors while flooded; equal keys
within 10 % of each other; no request hangs (every request answered before the client's 15 s timeout, with 200 or
429); a request the full queue refuses is answered quickly (429 p99 < 50 ms; a request shed after waiting, to make
room for one to be served before it, is answered the moment it is shed: its latency is its wait, reported apart).
Prints a Markdown table; exits 1 on a hang or an unclear answer, and with --strict on a missed target. On a shared
machine compare the ratios within one run: the absolute figures move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MASTER = "fairness-master-key"
sys.path.insert(0, str(ROOT))

from backends.mock_vllm import free_port  # noqa: E402
from bench.stack import create_api_key, platform_env, start_mock, start_platform, wait_http  # noqa: E402
from core.procs import stop_process  # noqa: E402

TOKEN_DELAY_S = 0.04
INTERACTIVE_TOKENS = 50
FLOOD_TOKENS = (5, 25)
MEAN_FLOOD_S = TOKEN_DELAY_S * sum(FLOOD_TOKENS) / 2
QUEUE_MAX = 32
CLIENT_TIMEOUT_S = 15.0
IDLE_REUSE_S = 3.0
SHED_WORDS = "took its place"  # in the message of a 429 whose queued request was shed for another
# The runs the targets compare (the names are the report's rows).
UNLOADED = "unloaded: interactive alone (0.1x)"
FLOODED = "(a) interactive (0.1x) while flooded"
FLOODER_1 = "(b) flooder 1 (5x)"
FLOODER_2 = "(b) flooder 2 (5x), equal weight"


# --- a small open-loop HTTP/1.1 client -----------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; httptools parses the answer."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.closed = False
        self.last_used = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # a malformed answer
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), b"".join(self.body)))
        self.body = []

    async def send(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


@dataclass
class Result:
    """What one key's client saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    ok_ms: list[float] = field(default_factory=list)
    rejected_ms: list[float] = field(default_factory=list)  # refused at arrival by a full queue
    shed_ms: list[float] = field(default_factory=list)  # 429s of requests that had waited and were shed for another
    hangs: int = 0
    errors: int = 0
    sent: int = 0

    def row(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.statuses.get(200, 0),
            "rejected": self.statuses.get(429, 0),
            "shed_after_waiting": len(self.shed_ms),
            "other_statuses": {str(s): n for s, n in self.statuses.items() if s not in (200, 429)},
            "hangs": self.hangs,
            "errors": self.errors,
            "p50_ms": _pct(self.ok_ms, 50),
            "p95_ms": _pct(self.ok_ms, 95),
            "p99_ms": _pct(self.ok_ms, 99),
            "refused_p50_ms": _pct(self.rejected_ms, 50),
            "refused_p99_ms": _pct(self.rejected_ms, 99),
            "shed_after_waiting_p50_ms": _pct(self.shed_ms, 50),
        }


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 1)


class Client:
    """Sends one key's requests at a fixed rate for a while (open loop), each on an idle keep-alive connection."""

    def __init__(self, port: int, secret: str, rate: float, tokens: tuple[int, int], seed: int) -> None:
        self.port = port
        self.secret = secret
        self.rate = rate
        self.tokens = tokens
        self.random = random.Random(seed)
        self.idle: list[_Connection] = []
        self.result = Result()

    def _request(self) -> bytes:
        max_tokens = self.random.randint(*self.tokens)
        body = json.dumps(
            {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
        ).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"authorization: Bearer {self.secret}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def _one(self) -> None:
        result = self.result
        result.sent += 1
        loop = asyncio.get_running_loop()
        connection = None
        now = time.monotonic()
        while self.idle:
            candidate = self.idle.pop()
            # uvicorn closes a connection idle for 5 s: one idle for 3 s is not reused (no race with that close)
            if not candidate.closed and now - candidate.last_used < IDLE_REUSE_S:
                connection = candidate
                break
            if candidate.transport is not None:
                candidate.transport.close()
        started = time.perf_counter()
        try:
            if connection is None:
                _, connection = await loop.create_connection(_Connection, "127.0.0.1", self.port)
            async with asyncio.timeout(CLIENT_TIMEOUT_S):
                status, body = await connection.send(self._request())
        except TimeoutError:
            result.hangs += 1
            if connection is not None and connection.transport is not None:
                connection.transport.close()
            return
        except (OSError, ConnectionError, ValueError):
            result.errors += 1
            return
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        result.statuses[status] += 1
        if status == 200:
            result.ok_ms.append(elapsed_ms)
        elif status == 429:
            (result.shed_ms if SHED_WORDS.encode() in body else result.rejected_ms).append(elapsed_ms)
        if not connection.closed:
            connection.last_used = time.monotonic()
            self.idle.append(connection)

    async def run(self, seconds: float) -> Result:
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / self.rate
        start = time.perf_counter()
        n = 0
        while True:
            due = start + n * interval
            if due - start >= seconds:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks)
        for connection in self.idle:
            if connection.transport is not None:
                connection.transport.close()
        return self.result


async def _together(clients: list[Client], seconds: float) -> list[Result]:
    return list(await asyncio.gather(*(c.run(seconds) for c in clients)))


# --- orchestration -----------------------------------------------------------------------------------------------


def _fmt(value: float | None, pattern: str = "{:.0f}") -> str:
    return "–" if value is None else pattern.format(value)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each loaded scenario")
    parser.add_argument("--slots", type=int, default=8, help="the backend's max_concurrent_requests")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fairness.json")
    return parser.parse_args()


def _keys_create(env: dict[str, str], port: int, slots: int) -> dict[str, str]:
    """Create the scenarios' keys (their secrets by name) and give the platform's one backend `slots` slots."""
    keys = {
        name: create_api_key(env, name, "--priority", priority, "--max-priority", priority)
        for name, priority in (
            ("interactive", "standard"),
            ("flooder", "standard"),
            ("flooder-2", "standard"),
            ("critical", "critical"),
            ("batch", "batch"),
        )
    }
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api", headers={"Authorization": f"Bearer {MASTER}"})
    api.patch("/backends/demo-mock-1/", json={"max_concurrent_requests": slots}).raise_for_status()
    time.sleep(1.5)  # the registry and the keys reach the running process within the 0.5 s reload interval
    return keys


def _scenarios(port: int, keys: dict[str, str], capacity: float, seconds: float) -> dict[str, Result]:
    """Run the scenarios one after the other (1, a, b, c of the module's docstring); each run's result by name."""

    def client(name: str, rate_x: float, tokens: tuple[int, int], seed: int) -> Client:
        return Client(port, keys[name], rate_x * capacity, tokens, seed)

    interactive = (INTERACTIVE_TOKENS, INTERACTIVE_TOKENS)
    asyncio.run(_together([client("interactive", 0.1, interactive, 1)], 2.0))  # warm-up
    (unloaded,) = asyncio.run(_together([client("interactive", 0.1, interactive, 2)], seconds))
    time.sleep(1.0)
    flooded, flood = asyncio.run(
        _together([client("interactive", 0.1, interactive, 3), client("flooder", 10, FLOOD_TOKENS, 4)], seconds)
    )
    time.sleep(2.0)
    first, second = asyncio.run(
        _together([client("flooder", 5, FLOOD_TOKENS, 5), client("flooder-2", 5, FLOOD_TOKENS, 6)], seconds)
    )
    time.sleep(2.0)
    critical, standard, batch = asyncio.run(
        _together(
            [
                client("critical", 0.25, FLOOD_TOKENS, 7),
                client("interactive", 0.4, FLOOD_TOKENS, 8),
                client("batch", 10, FLOOD_TOKENS, 9),
            ],
            seconds,
        )
    )
    (mixed_unloaded,) = asyncio.run(_together([client("critical", 0.25, FLOOD_TOKENS, 7)], seconds / 2))
    return {
        UNLOADED: unloaded,
        FLOODED: flooded,
        "(a) flooder, same class (10x)": flood,
        FLOODER_1: first,
        FLOODER_2: second,
        "(c) critical (0.25x), unloaded": mixed_unloaded,
        "(c) critical (0.25x)": critical,
        "(c) standard (0.4x)": standard,
        "(c) batch (10x)": batch,
    }


def _targets(runs: dict[str, Result], rows: dict[str, dict[str, Any]]) -> tuple[list[tuple[str, bool, str]], bool]:
    """Each target of issue 17 as (target, met, measured), and whether a request hung or got an unclear answer."""
    targets: list[tuple[str, bool, str]] = []
    base, loaded = rows[UNLOADED], rows[FLOODED]
    ratio = loaded["p99_ms"] / base["p99_ms"] if loaded["p99_ms"] and base["p99_ms"] else float("inf")
    targets.append(("(a) interactive p99 <= 1.5x unloaded", ratio <= 1.5, f"{ratio:.2f}x"))
    interactive_errors = runs[FLOODED].sent - runs[FLOODED].statuses.get(200, 0)
    targets.append(("(a) interactive errors = 0", interactive_errors == 0, str(interactive_errors)))
    a, b = runs[FLOODER_1].statuses.get(200, 0), runs[FLOODER_2].statuses.get(200, 0)
    gap = abs(a - b) / max(a, b, 1)
    targets.append(("(b) equal keys within 10 %", gap <= 0.10, f"{a} vs {b} ({gap:.1%})"))
    results = list(runs.values())
    hangs = sum(r.hangs for r in results)
    unclear = sum(r.errors + sum(n for s, n in r.statuses.items() if s not in (200, 429)) for r in results)
    targets.append(("no hangs, only 200 / 429", hangs == 0 and unclear == 0, f"hangs {hangs}, unclear {unclear}"))
    rejected = [ms for r in results for ms in r.rejected_ms]
    p99_429 = _pct(rejected, 99)
    targets.append(
        ("429 of a full queue p99 < 50 ms", p99_429 is not None and p99_429 < 50, f"{_fmt(p99_429, '{:.1f}')} ms")
    )
    return targets, bool(hangs or unclear)


def _print_report(
    args: argparse.Namespace, capacity: float, rows: dict[str, dict[str, Any]], targets: list[tuple[str, bool, str]]
) -> None:
    """The set-up in a line, a Markdown table of the runs, then PASS or MISS for each target."""
    print(
        f"backend: {args.slots} slots, flood service {FLOOD_TOKENS[0] * TOKEN_DELAY_S:g}-"
        f"{FLOOD_TOKENS[1] * TOKEN_DELAY_S:g} s (capacity ~{capacity:.0f} req/s), "
        f"interactive {INTERACTIVE_TOKENS * TOKEN_DELAY_S:g} s; "
        f"queue {QUEUE_MAX}; {args.seconds:g} s per scenario"
    )
    print(
        "| run | sent | 200 | 429 (of which shed after waiting) | 200s: p50 / p95 / p99 ms | "
        "429 refused at arrival: p50 / p99 ms | shed after waiting: p50 ms | hangs, errors |"
    )
    print("|---|---:|---:|---:|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['sent']:,} | {row['ok']:,} | {row['rejected']:,} ({row['shed_after_waiting']}) | "
            f"{_fmt(row['p50_ms'])} / {_fmt(row['p95_ms'])} / {_fmt(row['p99_ms'])} | "
            f"{_fmt(row['refused_p50_ms'], '{:.1f}')} / {_fmt(row['refused_p99_ms'], '{:.1f}')} | "
            f"{_fmt(row['shed_after_waiting_p50_ms'])} | "
            f"{row['hangs']}, {row['errors'] + sum(row['other_statuses'].values())} |"
        )
    print()
    for name, ok, measured in targets:
        print(f"{'PASS' if ok else 'MISS'} {name}: {measured}")


def main() -> int:
    args = _parse_args()
    capacity = args.slots / MEAN_FLOOD_S
    state = Path(tempfile.mkdtemp(prefix="fairness-"))
    env = platform_env(
        state,
        MASTER,
        LOG_LEVEL="ERROR",
        ROUTER_QUEUE_MAX=str(QUEUE_MAX),
        ROUTER_QUEUE_TIMEOUT_S="10",
        ROUTER_CIRCUIT_FAILURES="1000000",
    )
    mock_port, port = free_port(), free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock = start_mock(mock_port)
    web: subprocess.Popen[bytes] | None = None
    try:
        wait_http(f"{mock_url}/health")
        httpx.post(f"{mock_url}/mock/config", json={"token_delay_s": TOKEN_DELAY_S}, timeout=5).raise_for_status()
        web = start_platform(env, [mock_url], port, log_level="error")
        keys = _keys_create(env, port, args.slots)
        runs = _scenarios(port, keys, capacity, args.seconds)
    finally:
        stop_process(web, 15)
        stop_process(mock, 15)

    rows = {name: r.row() for name, r in runs.items()}
    targets, hard = _targets(runs, rows)
    report: dict[str, Any] = {"slots": args.slots, "capacity_rps": round(capacity, 1), "seconds": args.seconds}
    report["runs"] = rows
    report["targets"] = [{"target": t, "met": ok, "measured": m} for t, ok, m in targets]
    _print_report(args, capacity, rows, targets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    missed = not all(ok for _, ok, _ in targets)
    return 1 if hard or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
