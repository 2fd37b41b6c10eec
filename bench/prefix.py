"""Prefix-cache routing, measured: TTFT, throughput and the engines' prefix-cache hit rate per routing policy.

    .venv/bin/python bench/prefix.py            # `make bench-prefix`: the real CPU vLLM pool, 2 rounds
    .venv/bin/python bench/prefix.py --quick    # fewer documents and turns, 1 round
    .venv/bin/python bench/prefix.py --mock     # two bundled mock engines with a prefix cache (no vLLM needed)

Systems, each run on every workload in every round (the order reverses from one round to the next):
- `single server`: the client straight to one engine (the hit-rate reference: no routing can do better);
- the platform (one uvicorn process, as `make run`) with the pool's strategy set through the management API to
  round_robin, least_outstanding, session_affinity and prefix_aware;
- the peer vllm-router (PyPI `vllm-router`, installed on demand in its own venv) with `--policy round_robin`
  and `--policy cache_aware`;
- the production server (scripts/serve.sh, as `make serve`) with WEB_CONCURRENCY=2 and Redis, prefix_aware.

Workloads (bench/prefix_workloads.py): shared documents (questions about a few long documents, shuffled),
multi-turn (conversations sent with their whole history), no sharing (unique prompts). Chat completions,
streamed, temperature 0; TTFT is the time to the first chunk with content. Around every run the engines'
`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` are read, and the hit rate is the delta's
ratio. Every run starts its prompts with a tag of its own (block hashes chain from the first token, so no run
can hit another run's cached blocks), and when the engines serve POST /reset_prefix_cache (vLLM started with
VLLM_SERVER_DEV_MODE=1, as this script starts the pool when it is not up) their caches are emptied before
every run as well.

Writes a Markdown report (table, targets, placement, command) to bench/results/prefix-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.mock_vllm import free_port  # noqa: E402
from bench.prefix_workloads import WORKLOADS, Conversation, Sizes, Workload  # noqa: E402
from bench.stack import PY, platform_env, start_platform, wait_http  # noqa: E402

KEY = "prefix-bench-key"
REAL_PORTS = (18001, 18002)
REAL_MODEL = "smollm2"
MOCK_MODEL = "mock-chat"
HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
ROUTER_PIN = "vllm-router==0.1.17"
ROUTER_VENV = Path(os.environ.get("VLLM_ROUTER_VENV", "~/.cache/llm-platform-bench/vllm-router-venv")).expanduser()
STRATEGY_SETTLE_S = 2.0  # every web process reloads the registry within ROUTER_REGISTRY_POLL_S (0.5 s)
REQUEST_TIMEOUT_S = 300.0


# --- the systems under test ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    """One row group of the report: where the client sends its requests, with which policy."""

    label: str
    kind: str  # "single" | "platform" | "platform2" | "router"
    policy: str = ""


SYSTEMS = (
    System("single server", "single"),
    System("platform round_robin", "platform", "round_robin"),
    System("platform least_outstanding", "platform", "least_outstanding"),
    System("platform session_affinity", "platform", "session_affinity"),
    System("platform prefix_aware", "platform", "prefix_aware"),
    System("vllm-router round_robin", "router", "round_robin"),
    System("vllm-router cache_aware", "router", "cache_aware"),
    System("platform prefix_aware, 2 workers", "platform2", "prefix_aware"),
)
WORKLOAD_ORDER = ["shared documents", "multi-turn", "no sharing"]  # the titles of prefix_workloads' builders
SINGLE_SKIPS = {"nosharing"}  # one server on unique prompts measures nothing the targets use


@dataclass
class Engines:
    """The two chat engines (real vLLM or mocks) and the processes this script started for them."""

    urls: list[str]
    model: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    placement: str = ""
    resettable: bool = False
    """Whether every engine serves POST /reset_prefix_cache (vLLM: only with VLLM_SERVER_DEV_MODE=1)."""

    def render_served(self) -> bool:
        """Whether the engines serve POST /v1/chat/completions/render, which vllm-router's cache_aware needs.

        vLLM serves it only with --enable-scale-out (403 otherwise); without it vllm-router 0.1.17 counts every
        request as `preparation_rejected` and its cache_aware policy never consults its prefix tree.
        """
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}]}
        try:
            return all(
                httpx.post(f"{url}/v1/chat/completions/render", json=body, timeout=30).status_code == 200
                for url in self.urls
            )
        except httpx.HTTPError:
            return False

    def reset_caches(self) -> bool:
        """Empty every engine's prefix cache; False when one of them cannot."""
        try:
            return all(httpx.post(f"{url}/reset_prefix_cache", timeout=30).status_code == 200 for url in self.urls)
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Stop the mocks this script started (the real pool is left running for whoever started it)."""
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=10)


def real_engines() -> Engines:
    """The CPU vLLM pool of scripts/real_backend.sh on 18001/18002, started (and installed) when not up."""
    urls = [f"http://127.0.0.1:{port}" for port in REAL_PORTS]
    if not all(_healthy(url) for url in urls):
        # Dev mode serves POST /reset_prefix_cache (runs then start from empty caches, not only untouched blocks).
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        subprocess.run(["bash", "scripts/real_backend.sh", "start"], cwd=ROOT, env=env, check=True)
    placement = "vLLM A (:18001) on core 0, vLLM B (:18002) on core 1 (VLLM_CPU_OMP_THREADS_BIND)"
    engines = Engines(urls, REAL_MODEL, placement=placement)
    engines.resettable = engines.reset_caches()
    return engines


def mock_engines(prefill_ms_per_token: float) -> Engines:
    """Two bundled mock engines, one per core, whose first token waits for the uncached part of the prompt."""
    engines = Engines([], MOCK_MODEL, placement="mock A on core 0, mock B on core 1 (taskset)")
    for core in (0, 1):
        port = free_port()
        argv = ["taskset", "-c", str(core), PY, "-m", "backends.mock_vllm", "--port", str(port)]
        argv += ["--model", MOCK_MODEL, "--prefill-ms-per-token", str(prefill_ms_per_token)]
        engines.procs.append(subprocess.Popen(argv, cwd=ROOT))
        engines.urls.append(f"http://127.0.0.1:{port}")
        wait_http(f"{engines.urls[-1]}/health")
    engines.resettable = engines.reset_caches()
    return engines


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def ensure_router() -> Path:
    """The vllm-router executable, installed into its own venv on first use."""
    exe = ROUTER_VENV / "bin" / "vllm-router"
    if exe.exists():
        return exe
    ROUTER_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3.11", "-m", "venv", str(ROUTER_VENV)], check=True)
    subprocess.run([str(ROUTER_VENV / "bin" / "pip"), "install", "-q", ROUTER_PIN], check=True)
    return exe


@contextlib.contextmanager
def vllm_router(engines: Engines, policy: str, notes: list[str]) -> Iterator[str]:
    """Run vllm-router in front of the engines with this policy; yield its URL; note its decisions; stop it."""
    port, metrics_port = free_port(), free_port()
    argv = [str(ensure_router()), "--host", "127.0.0.1", "--port", str(port), "--policy", policy]
    argv += ["--worker-urls", *engines.urls, "--log-level", "warning", "--prometheus-port", str(metrics_port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120)
        yield f"http://127.0.0.1:{port}"
        notes.append(router_decisions(f"http://127.0.0.1:{metrics_port}/metrics"))
    finally:
        proc.terminate()
        proc.wait(timeout=15)


ROUTER_COUNTERS = (
    "vllm_router_cache_hits_total",
    "vllm_router_cache_misses_total",
    "vllm_router_load_balancing_events_total",
    "vllm_router_kv_routing_inputs_total",
)


def router_decisions(metrics_url: str) -> str:
    """vllm-router's own counters of its cache-aware decisions (how often its prefix tree was used at all)."""
    try:
        text = httpx.get(metrics_url, timeout=10).text
    except httpx.HTTPError as exc:
        return f"metrics unavailable ({exc!r})"
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ROUTER_COUNTERS:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found.append(f"`{sample.name}{{{labels}}}` {sample.value:g}")
    return "; ".join(found) or "no cache-aware decision counters"


@dataclass
class Platform:
    """A running platform (one uvicorn process, or the production server) and its management API client."""

    url: str
    proc: subprocess.Popen[bytes]
    pool: str
    api: httpx.Client

    def set_strategy(self, strategy: str) -> None:
        """PATCH the pool's routing strategy and give every web process time to reload the registry."""
        self.api.patch(f"/pools/{self.pool}/", json={"routing_strategy": strategy}).raise_for_status()
        time.sleep(STRATEGY_SETTLE_S)

    def stop(self) -> None:
        """SIGTERM (the production server passes it to its workers) and wait."""
        self.api.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _platform_setup(engines: Engines, mock: bool) -> tuple[dict[str, str], list[str], str]:
    """A fresh state folder's environment, the --mock-url list and the pool name for these engines."""
    state = Path(tempfile.mkdtemp(prefix="prefix-bench-"))
    if mock:
        return platform_env(state, KEY, LOG_LEVEL="WARNING"), engines.urls, "demo"
    extra = {"VLLM_BACKEND_URL": ",".join(engines.urls), "VLLM_MODEL_NAME": engines.model}
    return platform_env(state, KEY, LOG_LEVEL="WARNING", **extra), [], "vllm"


def _platform(url: str, proc: subprocess.Popen[bytes], pool: str) -> Platform:
    api = httpx.Client(base_url=f"{url}/api", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    return Platform(url, proc, pool, api)


def one_worker_platform(engines: Engines, mock: bool) -> Platform:
    """The platform as `make run` serves it: one uvicorn process (bench/stack.py), no Redis."""
    env, mock_urls, pool = _platform_setup(engines, mock)
    port = free_port()
    return _platform(f"http://127.0.0.1:{port}", start_platform(env, mock_urls, port), pool)


def two_worker_platform(engines: Engines, mock: bool, redis_url: str) -> Platform:
    """The production server (scripts/serve.sh, as `make serve`) with WEB_CONCURRENCY=2 and Redis."""
    env, mock_urls, pool = _platform_setup(engines, mock)
    subprocess.run([PY, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    setup = [PY, "manage.py", "setup_platform", *(arg for url in mock_urls for arg in ("--mock-url", url))]
    subprocess.run(setup, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    env |= {
        "PATH": f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}",
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "REDIS_URL": redis_url,
        "COLLECTSTATIC": "0",
        "UVICORN_LOG_LEVEL": "warning",
        "PROMETHEUS_MULTIPROC_DIR": f"{env['LOCAL_STATE_DIR']}/metrics",
    }
    proc = subprocess.Popen(["bash", "scripts/serve.sh"], cwd=ROOT, env=env)
    wait_http(f"http://127.0.0.1:{port}/readyz", timeout_s=60)
    return _platform(f"http://127.0.0.1:{port}", proc, pool)


@dataclass
class Stack:
    """Everything the systems need: the engines and both platforms (started once, strategies switched)."""

    engines: Engines
    one: Platform | None
    two: Platform | None
    notes: dict[str, list[str]] = field(default_factory=dict)

    @contextlib.contextmanager
    def serving(self, system: System) -> Iterator[str]:
        """Make this system ready (set the strategy, or start vllm-router) and yield the URL clients use."""
        if system.kind == "single":
            yield self.engines.urls[0]
        elif system.kind == "router":
            with vllm_router(self.engines, system.policy, self.notes.setdefault(system.label, [])) as url:
                yield url
        else:
            platform = self.one if system.kind == "platform" else self.two
            assert platform is not None, f"{system.label}: its platform was not started"
            platform.set_strategy(system.policy)
            yield platform.url


# --- the client ----------------------------------------------------------------------------------------------


class RequestFailed(Exception):
    """A request that did not end in a complete 200 stream."""


@dataclass
class RunResult:
    """What one workload run on one system measured."""

    system: str
    workload: str
    round: int
    requests: int
    ttfts: list[float] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    hits: float = 0.0
    queries: float = 0.0
    engine_queries: tuple[float, ...] = ()  # prompt tokens each engine was asked for (the routing's balance)
    samples: list[tuple[str, int, float, float, str, float]] = field(default_factory=list)
    """Every answered request: (session, turn index, seconds since the run started, TTFT, backend, seconds since the
    run started when its stream ended), for `--raw`."""
    started: float = 0.0


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[float, str, str]:
    """Send one streamed chat completion; return (seconds to the first content chunk, the answer, the backend
    the platform names in `x-router-backend`, else "")."""
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RequestFailed(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        backend = response.headers.get("x-router-backend", "")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank lines, SSE comments (keep-alives)
            data = line[5:].strip()
            if data == "[DONE]":
                return (first if first is not None else time.perf_counter() - start), "".join(parts), backend
            chunk = json.loads(data)
            if "error" in chunk:
                raise RequestFailed(f"error event: {str(chunk['error'])[:200]}")
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = time.perf_counter() - start if first is None else first
                    parts.append(text)
    raise RequestFailed("the stream ended without [DONE]")


@dataclass(frozen=True)
class Target:
    """Where and how the client sends: the system's URL, the model, the answer length."""

    client: httpx.AsyncClient
    url: str
    model: str
    max_tokens: int


async def conversation(target: Target, conv: Conversation, gate: asyncio.Semaphore, result: RunResult) -> None:
    """Send the conversation's turns in order, each with the whole history; a failed turn ends it."""
    messages: list[dict[str, str]] = [{"role": "system", "content": conv.system}]
    for index, turn in enumerate(conv.turns):
        messages.append({"role": "user", "content": turn})
        body = {"model": target.model, "messages": list(messages), "stream": True, "user": conv.session}
        body |= {"temperature": 0, "max_tokens": target.max_tokens}
        async with gate:
            sent = time.perf_counter() - result.started
            try:
                ttft, answer, backend = await stream_chat(target.client, target.url, body)
            except (httpx.HTTPError, RequestFailed, ValueError) as exc:
                result.failures += len(conv.turns) - index  # this turn and the ones it prevents
                result.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                return
        done = time.perf_counter() - result.started
        result.ttfts.append(ttft)
        result.samples.append((conv.session, index, round(sent, 4), round(ttft, 4), backend, round(done, 4)))
        messages.append({"role": "assistant", "content": answer})


async def run_workload(url: str, model: str, max_tokens: int, workload: Workload, result: RunResult) -> None:
    """All conversations at once, at most `workload.concurrency` requests in flight (FIFO), timed."""
    gate = asyncio.Semaphore(workload.concurrency)
    limits = httpx.Limits(max_connections=workload.concurrency * 2, max_keepalive_connections=workload.concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        start = result.started = time.perf_counter()
        target = Target(client, url, model, max_tokens)
        await asyncio.gather(*(conversation(target, c, gate, result) for c in workload.conversations))
        result.wall_s = time.perf_counter() - start


# --- measuring -----------------------------------------------------------------------------------------------


def cache_counters(urls: list[str]) -> tuple[float, list[float]]:
    """The engines' prefix-cache hits (summed) and queries (prompt tokens), per engine."""
    hits = 0.0
    queries = [0.0] * len(urls)
    for i, url in enumerate(urls):
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == HITS:
                    hits += sample.value
                elif sample.name == QUERIES:
                    queries[i] += sample.value
    return hits, queries


def prompt_tokens(engine_url: str, model: str, workload: Workload) -> int | None:
    """Tokens of the workload's first prompt, counted by the engine's own /tokenize (None if it has none)."""
    conv = workload.conversations[0]
    messages = [{"role": "system", "content": conv.system}, {"role": "user", "content": conv.turns[0]}]
    try:
        response = httpx.post(f"{engine_url}/tokenize", json={"model": model, "messages": messages}, timeout=30)
        return int(response.json()["count"]) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def tagged(workload: Workload, tag: str) -> Workload:
    """The workload with every prompt starting with this run's tag: no block of another run can match."""
    conversations = tuple(replace(c, system=f"[{tag}] {c.system}") for c in workload.conversations)
    return replace(workload, conversations=conversations)


def warm_up(url: str, model: str) -> None:
    """A few short requests, not measured (first connections, vllm-router's and each web worker's first)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2}
    for _ in range(4):  # a new connection each time, so that both web workers of the production server get one
        try:
            httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        except httpx.HTTPError as exc:  # the measured runs will count the failures
            print(f"[prefix] warm-up of {url}: {exc!r}", file=sys.stderr, flush=True)


def measure(engines: Engines, url: str, workload: Workload, result: RunResult, max_tokens: int) -> RunResult:
    """Run the workload against the URL; the engines' cache counters are read before and after."""
    if engines.resettable:
        engines.reset_caches()
    hits0, queries0 = cache_counters(engines.urls)
    asyncio.run(run_workload(url, engines.model, max_tokens, workload, result))
    time.sleep(0.5)  # the counters are updated as outputs are processed; leave a margin
    hits1, queries1 = cache_counters(engines.urls)
    result.engine_queries = tuple(after - before for before, after in zip(queries0, queries1, strict=True))
    result.hits, result.queries = hits1 - hits0, sum(result.engine_queries)
    return result


@dataclass(frozen=True)
class Plan:
    """What to run: systems, workloads and their sizes, rounds, seed, answer length."""

    systems: tuple[System, ...]
    workloads: tuple[str, ...]
    sizes: Sizes
    rounds: int
    seed: int
    max_tokens: int


def run_rounds(stack: Stack, plan: Plan) -> list[RunResult]:
    """Every round runs every system in turn (reversed order every other round) on every workload."""
    results: list[RunResult] = []
    for round_no in range(1, plan.rounds + 1):
        order = plan.systems if round_no % 2 else tuple(reversed(plan.systems))
        workloads = {name: WORKLOADS[name](plan.seed * 100 + round_no, plan.sizes) for name in plan.workloads}
        for system in order:
            runs = {
                name: RunResult(system.label, workload.name, round_no, workload.requests)
                for name, workload in workloads.items()
                if not (system.kind == "single" and name in SINGLE_SKIPS)
            }
            try:
                run_system(stack, system, workloads, runs, plan.max_tokens)
            except (OSError, RuntimeError, httpx.HTTPError, subprocess.SubprocessError) as exc:
                # The system could not be set up (or broke between runs): its unmeasured runs count as failed.
                print(f"[prefix] round {round_no} | {system.label}: {exc!r}", file=sys.stderr, flush=True)
                for run in runs.values():
                    if not run.wall_s:
                        run.failures, run.errors = run.requests, [f"not run: {exc!r}"[:300]]
            results += runs.values()
    return results


def run_system(
    stack: Stack, system: System, workloads: dict[str, Workload], runs: dict[str, RunResult], max_tokens: int
) -> None:
    """Set the system up, warm it up, and measure each of its runs in turn."""
    with stack.serving(system) as url:
        warm_up(url, stack.engines.model)
        for name, result in runs.items():
            workload = tagged(workloads[name], f"run {result.round} {system.label} {name}")
            measure(stack.engines, url, workload, result, max_tokens)
            print(progress_line(result), file=sys.stderr, flush=True)


def progress_line(r: RunResult) -> str:
    """One line per run while the benchmark goes."""
    p50 = statistics.median(r.ttfts) if r.ttfts else float("nan")
    rate = (r.requests - r.failures) / r.wall_s if r.wall_s else 0.0
    hit = f"{r.hits / r.queries:.1%}" if r.queries else "n/a"
    errors = f" ({r.errors[0]})" if r.errors else ""
    return (
        f"[prefix] round {r.round} | {r.system} | {r.workload}: {r.requests} req, TTFT p50 {p50:.2f} s, "
        f"{rate:.2f} req/s, {r.wall_s:.1f} s, hit {hit}, engine A {_share(r.engine_queries)}, "
        f"{r.failures} failed{errors}"
    )


def _share(engine_queries: tuple[float, ...]) -> str:
    """The first engine's share of the prompt tokens (50 % = balanced over two engines)."""
    total = sum(engine_queries)
    return f"{engine_queries[0] / total:.0%}" if total and len(engine_queries) > 1 else "n/a"


# --- the report ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One system on one workload, over all rounds: TTFTs pooled, rates from the summed counts."""

    system: str
    workload: str
    requests: int
    p50: float
    p90: float
    rps: float
    rps_runs: tuple[float, ...]
    wall_s: float
    hit_rate: float | None
    failures: int
    share_a: str = "n/a"


def _percentile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); NaN without values."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def aggregate(results: list[RunResult]) -> list[Row]:
    """One row per (system, workload), in the order the runs first appeared."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.workload, result.system), []).append(result)
    rows = []
    for (workload, system), runs in groups.items():
        ttfts = [t for r in runs for t in r.ttfts]
        done = sum(r.requests - r.failures for r in runs)
        wall = sum(r.wall_s for r in runs)
        queries = sum(r.queries for r in runs)
        rows.append(
            Row(
                system=system,
                workload=workload,
                requests=sum(r.requests for r in runs),
                p50=_percentile(ttfts, 50),
                p90=_percentile(ttfts, 90),
                rps=done / wall if wall else 0.0,
                rps_runs=tuple((r.requests - r.failures) / r.wall_s for r in runs if r.wall_s),
                wall_s=wall / len(runs),
                hit_rate=sum(r.hits for r in runs) / queries if queries else None,
                failures=sum(r.failures for r in runs),
                share_a=_share(tuple(map(sum, zip(*(r.engine_queries for r in runs), strict=True)))),
            )
        )
    order = {s.label: i for i, s in enumerate(SYSTEMS)}
    return sorted(rows, key=lambda row: (WORKLOAD_ORDER.index(row.workload), order[row.system]))


PA, PA2 = "platform prefix_aware", "platform prefix_aware, 2 workers"
RR, LO, SINGLE, CA = "platform round_robin", "platform least_outstanding", "single server", "vllm-router cache_aware"


def _ratio_check(
    rows: dict[tuple[str, str], Row], workload: str, pair: tuple[str, str], what: str, factor: float
) -> tuple[str, str, bool] | None:
    """`pair[0].what` against `factor` x `pair[1].what` (TTFT: at most; rates: at least)."""
    a, b = rows.get((workload, pair[0])), rows.get((workload, pair[1]))
    if a is None or b is None:
        return None
    x, y = getattr(a, what), getattr(b, what)
    if x is None or y is None:
        return None
    ok = x <= factor * y if what == "p50" else x >= factor * y
    sign = "<=" if what == "p50" else ">="
    label = {"p50": "TTFT p50", "rps": "req/s", "hit_rate": "hit rate"}[what]
    return f"{workload}: {pair[0]} {label} {sign} {factor:g} x {pair[1]}", f"{x:.3f} vs {y:.3f}", ok


def targets(row_list: list[Row]) -> list[tuple[str, str, bool]]:
    """The issue's targets that the rows present allow to check: (description, figures, met)."""
    rows = {(r.workload, r.system): r for r in row_list}
    checks: list[tuple[str, str, bool] | None] = []
    for workload in ("shared documents", "multi-turn"):
        checks += [
            _ratio_check(rows, workload, (PA, SINGLE), "hit_rate", 0.9),
            _ratio_check(rows, workload, (PA, RR), "p50", 0.5),
            _ratio_check(rows, workload, (PA, CA), "p50", 1.0),
            _ratio_check(rows, workload, (PA, RR), "rps", 1.3),
            _two_workers_check(rows, workload),
        ]
    checks.append(_ratio_check(rows, "no sharing", (PA, LO), "rps", 0.95))
    failed = sum(r.failures for r in row_list)
    checks.append(("every system, every workload: failed requests", str(failed), failed == 0))
    return [c for c in checks if c is not None]


def _two_workers_check(rows: dict[tuple[str, str], Row], workload: str) -> tuple[str, str, bool] | None:
    """Two web workers: hit rate within 5 points and TTFT p50 no more than 15 % above one worker's."""
    one, two = rows.get((workload, PA)), rows.get((workload, PA2))
    if one is None or two is None or one.hit_rate is None or two.hit_rate is None:
        return None
    points = abs(two.hit_rate - one.hit_rate) * 100
    ttft = (two.p50 - one.p50) / one.p50 if one.p50 else float("inf")  # lower is better: only worse counts
    figures = f"hit {two.hit_rate:.1%} vs {one.hit_rate:.1%} ({points:.1f} pt), TTFT p50 {ttft:+.0%}"
    label = f"{workload}: 2 workers within 5 pt hit rate of 1, TTFT p50 at most 15 % above"
    return label, figures, points <= 5 and ttft <= 0.15


def table(rows: list[Row]) -> list[str]:
    """The Markdown table: one line per workload and system."""
    lines = [
        "| workload | system | requests | TTFT p50 (s) | TTFT p90 (s) | req/s (per round) | wall (s) | hit rate "
        "| engine A | failed |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        per_round = " / ".join(f"{x:.2f}" for x in r.rps_runs)
        hit = f"{r.hit_rate:.1%}" if r.hit_rate is not None else "n/a"
        lines.append(
            f"| {r.workload} | {r.system} | {r.requests} | {r.p50:.2f} | {r.p90:.2f} | {r.rps:.2f} ({per_round}) "
            f"| {r.wall_s:.1f} | {hit} | {r.share_a} | {r.failures} |"
        )
    return lines


@dataclass
class Meta:
    """What the report says about the run besides the figures."""

    command: str
    mode: str
    placement: str
    plan: Plan
    tokens: dict[str, int | None] = field(default_factory=dict)
    load: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    resettable: bool = False
    render: bool = False
    notes: dict[str, list[str]] = field(default_factory=dict)


def turn_table(results: list[RunResult]) -> list[str]:
    """Multi-turn TTFT split by turn: the first turn (nothing cached anywhere) and the later ones.

    The later turns are where routing matters (their history is cached on the backend that served the turn
    before); the first turns cost the same whoever routes them. Empty without multi-turn samples.
    """
    groups: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        if r.workload == "multi-turn":
            groups.setdefault(r.system, []).extend((turn, ttft) for _, turn, _, ttft, *_ in r.samples)
    if not groups:
        return []
    lines = [
        "Multi-turn TTFT by turn (pooled over rounds; later turns are where routing matters, first turns have "
        "nothing cached anywhere):",
        "",
        "| system | first turns p50 (s) | later turns p50 (s) | later turns p75 (s) | later turns p90 (s) |",
        "|---|--:|--:|--:|--:|",
    ]
    for system, samples in groups.items():
        first = [t for turn, t in samples if turn == 0]
        later = [t for turn, t in samples if turn > 0]
        cells = (
            statistics.median(first) if first else float("nan"),
            statistics.median(later) if later else float("nan"),
            _percentile(later, 75),
            _percentile(later, 90),
        )
        lines.append(f"| {system} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    return ["", *lines]


def overlap_table(results: list[RunResult]) -> list[str]:
    """Multi-turn later turns split by whether a first turn's prefill ran on the same engine at the same time.

    A later turn's own prefill is short (its history is cached where the turn before ran), but an engine computes
    the prompts it holds together, step by step: a later turn that arrives while a first turn (about 1,000 uncached
    tokens) is being prefilled on its engine waits for that work too. Here a later turn counts as overlapped when
    its interval (sent, first token) intersects a first turn's on the same engine. Systems whose answers name no
    backend are left out, except the single server (one engine). Empty without such samples.
    """
    groups: dict[str, tuple[list[float], list[float]]] = {}  # system: (overlapped, not overlapped) TTFTs
    for r in results:
        known = r.system == SINGLE or all(backend for _, _, _, _, backend, _ in r.samples)
        if r.workload != "multi-turn" or not r.samples or not known:
            continue
        hit, clear = groups.setdefault(r.system, ([], []))
        # within this run only: each run's clock starts at 0
        firsts = [(sent, sent + ttft, backend) for _, turn, sent, ttft, backend, _ in r.samples if turn == 0]
        for _, turn, sent, ttft, backend, _ in r.samples:
            if turn > 0:
                end = sent + ttft
                overlapped = any(b == backend and s < end and sent < e for s, e, b in firsts)
                (hit if overlapped else clear).append(ttft)
    if not groups:
        return []
    lines = [
        "Multi-turn later turns, by whether a first turn was being prefilled on the same engine meanwhile "
        "(interval from sending to the first token; pooled over rounds):",
        "",
        "| system | later turns overlapped | their p50 / p75 (s) | not overlapped | their p50 / p75 (s) |",
        "|---|--:|--:|--:|--:|",
    ]
    for system, (hit, clear) in groups.items():
        cells = []
        for group in (hit, clear):
            p50 = statistics.median(group) if group else float("nan")
            cells += [str(len(group)), f"{p50:.2f} / {_percentile(group, 75):.2f}"]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return ["", *lines]


def load_table(results: list[RunResult]) -> list[str]:
    """Multi-turn later turns by how many other requests were open on their own engine, and on the other engines,
    when they were sent (a request is open from its sending to the end of its stream).

    This compares systems at equal load per engine: the single server always has the client's other requests on
    its one engine, a two-engine system spreads them. Where a two-engine system's turns are slower than the single
    server's at the same count on their own engine, the difference is not the routing (both hold the history: see
    the hit rates) but what else runs on the machine meanwhile. Systems whose answers name no backend are left
    out, except the single server. Empty without such samples.
    """
    groups: dict[str, dict[tuple[int, int], list[float]]] = {}  # system: (own engine, others) -> TTFTs
    for r in results:
        known = r.system == SINGLE or all(backend for _, _, _, _, backend, _ in r.samples)
        if r.workload != "multi-turn" or not r.samples or not known:
            continue
        cells = groups.setdefault(r.system, {})
        spans = [(sent, done, backend) for _, _, sent, _, backend, done in r.samples]
        for i, (_, turn, sent, ttft, backend, _) in enumerate(r.samples):
            if turn == 0:
                continue
            own = other = 0
            for j, (s, e, b) in enumerate(spans):
                if j != i and s <= sent < e:
                    own, other = (own + 1, other) if b == backend else (own, other + 1)
            cells.setdefault((own, other), []).append(ttft)
    if not groups:
        return []
    keys = sorted({key for cells in groups.values() for key in cells})
    lines = [
        "Multi-turn later turns by the requests open when each was sent, on its own engine + on the other "
        "(TTFT p50 in s, and how many turns; pooled over rounds):",
        "",
        "| system | " + " | ".join(f"{own} + {other}" for own, other in keys) + " |",
        "|---|" + "--:|" * len(keys),
    ]
    for system, cells in groups.items():
        row = [f"{statistics.median(cells[k]):.2f} ({len(cells[k])})" if k in cells else "" for k in keys]
        lines.append(f"| {system} | " + " | ".join(row) + " |")
    return ["", *lines]


def render(meta: Meta, rows: list[Row], results: list[RunResult]) -> str:
    """The whole Markdown report."""
    plan, sizes = meta.plan, meta.plan.sizes
    tokens = ", ".join(f"{name} {count if count is not None else 'n/a'}" for name, count in meta.tokens.items())
    lines = [
        f"# Prefix-cache routing benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC ({meta.mode})",
        "",
        f"Command: `{meta.command}` — {plan.rounds} round(s), seed {plan.seed}, {meta.duration_s / 60:.1f} min "
        "in all (start-up included).",
        "",
        f"Placement (2 cores): {meta.placement}; the platform, vllm-router, Redis and the client are not pinned "
        f"(they share both cores with the engines). Machine load average: {' -> '.join(meta.load)}.",
        "",
        f"Workloads: shared documents {sizes.docs} x {sizes.questions_per_doc} questions (shuffled); multi-turn "
        f"{sizes.conversations} conversations x {sizes.turns} turns (whole history each turn); no sharing "
        f"{sizes.unique_prompts} unique prompts. Concurrency {sizes.concurrency}, streamed chat, temperature 0, "
        f"max_tokens {plan.max_tokens}. First prompt's tokens (engine /tokenize): {tokens}.",
        "",
        *table(rows),
        "",
        "TTFT: time to the first chunk with content, pooled over rounds. req/s: answered requests / wall time, "
        "summed over rounds (each round's in brackets). Engine A: the first engine's share of the prompt tokens "
        "(50 % = balanced). Hit rate: delta of `vllm:prefix_cache_hits_total` / "
        "`vllm:prefix_cache_queries_total` summed over both engines (prompt tokens).",
        "",
        "Every run's prompts start with a tag of their own (no run can hit another's cached blocks); engine prefix "
        f"caches also emptied before every run (POST /reset_prefix_cache): {'yes' if meta.resettable else 'no'}. "
        "Engines serve /v1/chat/completions/render (vllm-router cache_aware tokenizes with it; vLLM "
        f"--enable-scale-out): {'yes' if meta.render else '**no**: its cache_aware falls back to load balancing'}.",
        *turn_table(results),
        *overlap_table(results),
        *load_table(results),
        "",
        "| target | figures | met |",
        "|---|---|---|",
        *(f"| {what} | {figures} | {'yes' if ok else '**no**'} |" for what, figures, ok in targets(rows)),
    ]
    errors = [
        f"- {r.system} / {r.workload} / round {r.round}: {r.failures} failed, first: {r.errors[0]}"
        for r in results
        if r.errors
    ]
    if errors:
        lines += ["", "Failed requests:", *errors]
    notes = [f"- {system}: {' | '.join(dict.fromkeys(n))}" for system, n in meta.notes.items() if n]
    if notes:
        lines += ["", "vllm-router's own decision counters at the end of each of its runs:", *notes]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer documents and turns, 1 round")
    parser.add_argument("--mock", action="store_true", help="two bundled mock engines instead of the vLLM pool")
    parser.add_argument("--rounds", type=int, help="rounds (default 2; --quick: 1)")
    parser.add_argument("--seed", type=int, default=13, help="text seed (default 13)")
    parser.add_argument("--max-tokens", type=int, default=12, help="answer length (default 12)")
    parser.add_argument("--systems", default="", help="comma-separated substrings of system labels (default all)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    parser.add_argument("--prefill-ms-per-token", type=float, default=1.0, help="mock prefill cost (--mock)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, help="report file (default bench/results/prefix[-quick|-mock]-<date>.md)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--raw", type=Path, help="also write every request's TTFT (JSON lines) to this file")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan the arguments ask for."""
    wanted = [w.strip() for w in args.systems.split(",") if w.strip()]
    systems = tuple(s for s in SYSTEMS if not wanted or any(w in s.label for w in wanted))
    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not systems:
        raise SystemExit(f"unknown workloads {unknown} or no system matches {args.systems!r}")
    sizes = Sizes.quick() if args.quick else Sizes()
    rounds = args.rounds or (1 if args.quick else 2)
    return Plan(systems, workloads, sizes, rounds, args.seed, args.max_tokens)


def default_out(args: argparse.Namespace) -> Path:
    """bench/results/prefix-<date>.md, with -quick / -mock for the smaller runs."""
    kind = "".join(suffix for flag, suffix in ((args.mock, "-mock"), (args.quick, "-quick")) if flag)
    return ROOT / "bench" / "results" / f"prefix{kind}-{datetime.date.today():%Y-%m-%d}.md"


def run(args: argparse.Namespace, plan: Plan, meta: Meta) -> list[RunResult]:
    """Start the engines and the platforms the plan needs, run the rounds, stop what was started."""
    with contextlib.ExitStack() as cleanup:
        engines = mock_engines(args.prefill_ms_per_token) if args.mock else real_engines()
        cleanup.callback(engines.stop)
        meta.placement = engines.placement
        meta.tokens = {
            name: prompt_tokens(engines.urls[0], engines.model, WORKLOADS[name](plan.seed, plan.sizes))
            for name in plan.workloads
        }
        kinds = {s.kind for s in plan.systems}
        one = one_worker_platform(engines, args.mock) if "platform" in kinds else None
        if one is not None:
            cleanup.callback(one.stop)
        two = two_worker_platform(engines, args.mock, args.redis_url) if "platform2" in kinds else None
        if two is not None:
            cleanup.callback(two.stop)
        if "router" in kinds:
            ensure_router()
        stack = Stack(engines, one, two, notes=meta.notes)
        meta.resettable, meta.render = engines.resettable, engines.render_served()
        if "router" in kinds and not meta.render:
            print(
                "[prefix] WARNING: the engines do not serve /v1/chat/completions/render (vLLM --enable-scale-out): "
                "vllm-router cache_aware will not use its prefix tree",
                file=sys.stderr,
                flush=True,
            )
        return run_rounds(stack, plan)
    raise AssertionError("unreachable")  # for type checkers: ExitStack may swallow exceptions


def write_raw(path: Path, results: list[RunResult]) -> None:
    """One JSON line per answered request: system, workload, round, session, turn, sent at (s), TTFT (s),
    backend (when the platform names it), stream ended at (s)."""
    keys = ("session", "turn", "sent_s", "ttft_s", "backend", "done_s")
    with path.open("w") as out:
        for r in results:
            for sample in r.samples:
                fields = dict(zip(keys, sample, strict=True))
                line = {"system": r.system, "workload": r.workload, "round": r.round, **fields}
                out.write(json.dumps(line) + "\n")
    print(f"raw TTFTs written to {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report and write it."""
    args = parse_args(argv)
    plan = make_plan(args)
    command = shlex.join(["bench/prefix.py", *(sys.argv[1:] if argv is None else argv)])
    meta = Meta(
        command=command, mode="mock engines" if args.mock else "CPU vLLM, SmolLM2-135M", placement="", plan=plan
    )
    meta.load.append(f"{os.getloadavg()[0]:.1f}")
    started = time.monotonic()
    results = run(args, plan, meta)
    meta.duration_s = time.monotonic() - started
    meta.load.append(f"{os.getloadavg()[0]:.1f}")
    rows = aggregate(results)
    report = render(meta, rows, results)
    print(report)
    out = args.out or default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}", file=sys.stderr)
    if args.raw is not None:
        write_raw(args.raw, results)
    missed = [what for what, _, ok in targets(rows) if not ok]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
