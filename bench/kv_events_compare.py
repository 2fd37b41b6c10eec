"""Precise (vLLM KV-cache events) vs approximate (the router's memory of what it sent) prefix routing, against
the engines' own count of cached prompt tokens.

Needs two real vLLM servers started with KV events, prefix caching (on by default) and prompt token details,
e.g. (see docs/kv-events.md for the full command):

    python -m vllm.entrypoints.openai.api_server ... --port 18041 --enable-prompt-tokens-details \
        --kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5581"}'

    .venv/bin/python bench/kv_events_compare.py --ports 18041,18042

For each mode the same seeded workload runs, one request at a time: a tag of its own (so no mode hits another
mode's blocks), D documents of ~5 blocks as system messages, R requests each asking a question about a random
document. The bench itself is the router: it tokenizes each request with the engine's POST /tokenize, turns the
tokens into block keys (routing.kv_events.block_keys) and picks a backend:

- round_robin: in turn;
- approximate xP: P router processes (requests alternate between them, as between web processes), each
  remembering the blocks it sent to each backend in an LRU as large as the engine's cache: most matched
  leading blocks wins; ties go to the backend this process sent fewer requests to, then at random;
- precise xP: the same rule over routing.kv_events indexes fed by the engines' BlockStored / BlockRemoved
  events (the same for every process: they all hear the engines).

Each answer's usage.prompt_tokens_details.cached_tokens is the truth: the report gives the hit rate, how often
the mode's prediction of cached tokens was right, too high (a "phantom" hit: blocks the router believed
cached were evicted or never there) or too low, and how long events took to show a request's blocks.

`--platform` runs the same workload THROUGH the platform instead: two router processes (two uvicorn processes on
one registry, requests alternating between them, as between web processes or replicas), the pool's strategy
`prefix_aware`, in each of these modes:

- `approximate-unshared`: ROUTER_KV_EVENTS=0 and ROUTER_PREFIX_SYNC=0 (two replicas without a shared Redis);
- `approximate`: ROUTER_KV_EVENTS=0, the indexes shared through Redis (the default with REDIS_URL);
- `precise`: ROUTER_KV_EVENTS=1 (the engines' KV-cache events; endpoints found at GET /kv_event_sources).

Here the bench only watches: its own subscription to the events says, before each request, how many leading
blocks each engine holds, so the report says how often the platform chose an engine holding the most
("best choice"), and the cached tokens the platform's choices missed against that best. With
`--start-engines` the two engines are started here (as docs/kv-events.md shows) and stopped at the end.

    .venv/bin/python bench/kv_events_compare.py --platform --start-engines --docs 24 --requests 120 --seed 11
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routing.kv_events import KvEventsHub, block_keys, endpoint_from_sources  # noqa: E402

WORDS = [
    "river",
    "council",
    "merchant",
    "lighthouse",
    "keeper",
    "farmers",
    "engineer",
    "harbour",
    "school",
    "weavers",
    "guides",
    "archivist",
    "sailor",
    "bakers",
    "bridge",
    "barrels",
    "grain",
    "map",
    "valley",
    "wheel",
    "stores",
    "lamps",
    "orchard",
    "records",
    "sheep",
    "bell",
    "wall",
    "letter",
    "capital",
    "repaired",
    "measured",
    "described",
    "carried",
    "planted",
    "painted",
    "counted",
    "sold",
    "studied",
    "rebuilt",
    "questioned",
    "remembered",
    "before",
    "winter",
    "after",
    "the",
    "storm",
    "during",
    "market",
    "week",
    "at",
    "dawn",
    "in",
    "secret",
    "for",
    "the",
    "festival",
]
QUESTIONS = (
    "Summarise the document in one sentence.",
    "Who is mentioned first?",
    "What was repaired?",
    "List three objects from the text.",
    "What happened at dawn?",
    "Name one place in the document.",
)


def document(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


class LruBlocks:
    """What one router process believes one backend holds: block keys it sent there, least recent evicted."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: OrderedDict[int, None] = OrderedDict()

    def matched(self, keys: list[int]) -> int:
        n = 0
        for key in keys:
            if key not in self.keys:
                break
            n += 1
        return n

    def add(self, keys: list[int]) -> None:
        for key in keys:
            self.keys[key] = None
            self.keys.move_to_end(key)
        while len(self.keys) > self.capacity:
            self.keys.popitem(last=False)


@dataclass
class Result:
    mode: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    exact: int = 0
    phantom: int = 0
    missed: int = 0
    requests: int = 0
    per_backend: dict[str, int] = field(default_factory=dict)
    tokenize_ms: list[float] = field(default_factory=list)
    event_lag_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, backend: str, *, prompt_tokens: int, cached: int, predicted: int) -> None:
        """Count one answered request: its tokens, and whether the predicted cached tokens were right."""
        self.per_backend[backend] += 1
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached
        if predicted == cached:
            self.exact += 1
        elif predicted > cached:
            self.phantom += 1
        else:
            self.missed += 1


def choose(
    mode: str,
    i: int,
    keys: list[int],
    *,
    names: list[str],
    hub: KvEventsHub,
    memory: dict[str, LruBlocks],
    sent: dict[str, int],
    tie_rng: random.Random,
) -> tuple[str, dict[str, int]]:
    """The backend for request `i` and each backend's matched blocks as the mode sees them (round robin: none;
    precise: the hub's indexes; approximate: this router process's own memory). Ties go to the process's least
    used backend, then at random."""
    if mode == "round_robin":
        return names[i % len(names)], dict.fromkeys(names, 0)
    if mode.startswith("precise"):
        scores = {name: hub.matched_blocks(name, keys) or 0 for name in names}
    else:
        scores = {name: memory[name].matched(keys) for name in names}
    best = max(scores.values())
    tied = [n for n in names if scores[n] == best]
    fewest = min(sent[n] for n in tied)
    return tie_rng.choice([n for n in tied if sent[n] == fewest]), scores


async def event_lag_ms(hub: KvEventsHub, backend: str, keys: list[int], full: int) -> float:
    """How long until the backend's KV events show all `full` blocks of the prompt in the hub's index (1 s at most)."""
    index = hub.index(backend)
    t = time.perf_counter()
    # the index has no change notification: poll it (1 ms, at most 1 s)
    while index is not None and index.matched_blocks(keys) < full and time.perf_counter() - t < 1.0:  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    return (time.perf_counter() - t) * 1000


async def run_mode(
    mode: str,
    *,
    client: httpx.AsyncClient,
    urls: dict[str, str],
    hub: KvEventsHub,
    docs: int,
    requests: int,
    seed: int,
    capacity: int,
    processes: int,
    block_size: int,
    model: str,
) -> Result:
    rng = random.Random(seed)
    tag = f"[{mode} {seed} {time.time_ns()}]"
    texts = [f"{tag} Document {i}. " + document(rng, 420) for i in range(docs)]
    names = list(urls)
    memories = [{name: LruBlocks(capacity) for name in names} for _ in range(processes)]
    # each router process knows only its own counts; ties go to its least used backend, then at random
    sent = [dict.fromkeys(names, 0) for _ in range(processes)]
    tie_rng = random.Random(seed + 1)
    result = Result(mode=mode, per_backend=dict.fromkeys(names, 0))
    t0 = time.perf_counter()
    for i in range(requests):
        messages = [
            {"role": "system", "content": texts[rng.randrange(docs)]},
            {"role": "user", "content": rng.choice(QUESTIONS)},
        ]
        t = time.perf_counter()
        tok = await client.post(f"{urls[names[0]]}/tokenize", json={"model": model, "messages": messages})
        tok.raise_for_status()
        result.tokenize_ms.append((time.perf_counter() - t) * 1000)
        tokens = tok.json()["tokens"]
        keys = block_keys(tokens, block_size)
        usable = (len(tokens) - 1) // block_size  # vLLM always recomputes the last token
        process = i % processes
        chosen, scores = choose(
            mode, i, keys, names=names, hub=hub, memory=memories[process], sent=sent[process], tie_rng=tie_rng
        )
        sent[process][chosen] += 1
        response = await client.post(
            f"{urls[chosen]}/v1/chat/completions",
            json={"model": model, "messages": messages, "max_tokens": 1, "temperature": 0},
        )
        response.raise_for_status()
        usage = response.json()["usage"]
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        predicted = min(scores[chosen], usable) * block_size
        result.record(chosen, prompt_tokens=usage["prompt_tokens"], cached=cached, predicted=predicted)
        if mode.startswith("approximate"):
            memories[process][chosen].add(keys)
        if mode.startswith("precise"):
            result.event_lag_ms.append(await event_lag_ms(hub, chosen, keys, len(tokens) // block_size))
    result.seconds = time.perf_counter() - t0
    return result


def report(results: list[Result], args: argparse.Namespace, hub_stats: dict) -> str:
    lines = [
        f"docs {args.docs}, requests {args.requests} per mode, one at a time, seed {args.seed}, "
        f"LRU / engine capacity {args.capacity} blocks of {args.block_size} tokens per backend",
        "",
        "| mode | hit rate (cached / prompt tokens) | prediction exact | phantom (too high) | missed (too low) "
        "| requests per backend | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        split = " / ".join(str(v) for v in r.per_backend.values())
        lines.append(
            f"| {r.mode} | {r.cached_tokens / max(r.prompt_tokens, 1):.1%} | {r.exact}/{r.requests} "
            f"| {r.phantom} | {r.missed} | {split} | {r.seconds:.0f} s |"
        )
    tok = [ms for r in results for ms in r.tokenize_ms]
    lag = [ms for r in results for ms in r.event_lag_ms]
    lines.append("")
    lines.append(
        f"POST /tokenize: median {statistics.median(tok):.1f} ms, p95 {sorted(tok)[int(len(tok) * 0.95)]:.1f} ms "
        f"({len(tok)} calls)"
    )
    if lag:
        lines.append(
            f"events visible after the answer: median {statistics.median(lag):.1f} ms, max {max(lag):.1f} ms "
            "(0 = already there when the answer arrived)"
        )
    for name, s in hub_stats.items():
        lines.append(
            f"index {name}: {s.blocks} blocks, stored {s.stored}, removed {s.removed}, orphans {s.orphans}, "
            f"gaps {s.gaps}, restarts {s.restarts}, skipped {s.skipped}"
        )
    return "\n".join(lines)


# --- through the platform -------------------------------------------------------------------------------------

REAL_BACKEND = Path(os.environ.get("REAL_BACKEND_CACHE", "~/.cache/llm-platform-real-backend")).expanduser()
PLATFORM_MODES = {
    "approximate-unshared": {"ROUTER_KV_EVENTS": "0", "ROUTER_PREFIX_SYNC": "0"},
    "approximate": {"ROUTER_KV_EVENTS": "0", "ROUTER_PREFIX_SYNC": "1"},
    "precise": {"ROUTER_KV_EVENTS": "1", "ROUTER_PREFIX_SYNC": "1"},
}
KEY = "kv-events-bench-key"


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_engines(ports: list[int], event_ports: list[int], capacity: int) -> list[subprocess.Popen[bytes]]:
    """Start one CPU vLLM per port (core i), KV events bound on tcp://*:EVENT_PORT; those already up are kept."""
    procs = []
    for core, (port, events) in enumerate(zip(ports, event_ports, strict=True)):
        if healthy(f"http://127.0.0.1:{port}"):
            print(f"engine on {port}: already up", flush=True)
            continue
        config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events}", "topic": "kv"}
        env = os.environ | {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(core % (os.cpu_count() or 1)),
        }
        argv = [
            str(REAL_BACKEND / "venv/bin/python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            str(REAL_BACKEND / "models/SmolLM2-135M-Instruct-bf16"),
            "--served-model-name",
            "smollm2",
            "--max-model-len",
            "2048",
            "--enforce-eager",
            "--enable-prompt-tokens-details",
            "--num-gpu-blocks-override",
            str(capacity),
            "--kv-events-config",
            json.dumps(config),
        ]
        log = open(Path(tempfile.gettempdir()) / f"kv-events-engine-{port}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        print(f"engine on {port}: starting (log {log.name})", flush=True)
    deadline = time.monotonic() + 600
    for port in ports:
        while not healthy(f"http://127.0.0.1:{port}"):
            if time.monotonic() > deadline:
                stop_engines(procs)
                raise RuntimeError(f"engine on {port} did not come up")
            time.sleep(2)
    return procs


def start_mock_engines(ports: list[int], event_ports: list[int], capacity: int) -> list[subprocess.Popen[bytes]]:
    """Two bundled mock engines with a prefix cache of `capacity` x 8 blocks of 16 tokens, publishing KV events."""
    procs = []
    for port, events in zip(ports, event_ports, strict=True):
        argv = [sys.executable, "-m", "backends.mock_vllm", "--port", str(port), "--model", "smollm2"]
        argv += ["--kv-events-port", str(events), "--prefix-cache-blocks", str(capacity * 8)]
        argv += ["--prefix-cache-block-size", "16", "--prefill-ms-per-token", "0.2"]
        procs.append(subprocess.Popen(argv, cwd=ROOT, start_new_session=True))
    for port in ports:
        deadline = time.monotonic() + 30
        while not healthy(f"http://127.0.0.1:{port}"):
            if time.monotonic() > deadline:
                stop_engines(procs)
                raise RuntimeError(f"mock engine on {port} did not come up")
            time.sleep(0.2)
    return procs


def stop_engines(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)


def start_routers(
    mode: str, urls: list[str], redis_url: str, tokenize_ms: int
) -> tuple[list[str], list[subprocess.Popen[bytes]]]:
    """Two router processes on one fresh registry (the engines as pool `vllm`, strategy prefix_aware)."""
    from bench.stack import platform_env, start_platform
    from core.procs import free_port

    state = Path(tempfile.mkdtemp(prefix="kv-events-bench-"))
    env = platform_env(
        state,
        KEY,
        LOG_LEVEL="WARNING",
        VLLM_BACKEND_URL=",".join(urls),
        VLLM_MODEL_NAME="smollm2",
        REDIS_URL=redis_url,
        ROUTER_KV_EVENTS_TOKENIZE_TIMEOUT_MS=str(tokenize_ms),
        **PLATFORM_MODES[mode],
    )
    procs = []
    routers = []
    for _ in range(2):
        port = free_port()
        procs.append(start_platform(env, [], port))
        routers.append(f"http://127.0.0.1:{port}")
    api = httpx.Client(base_url=f"{routers[0]}/api", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    api.patch("/pools/vllm/", json={"routing_strategy": "prefix_aware"}).raise_for_status()
    api.close()
    time.sleep(2.0)  # every process reloads the registry within ROUTER_REGISTRY_POLL_S
    return routers, procs


@dataclass
class PlatformResult:
    mode: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    best_tokens: int = 0
    best_choice: int = 0
    failed: int = 0
    latency_s: list[float] = field(default_factory=list)
    per_backend: dict[str, int] = field(default_factory=dict)
    estimated: dict[str, float | None] = field(default_factory=dict)
    events_blocks: dict[str, int | None] = field(default_factory=dict)
    engine_hits: float = 0.0
    engine_queries: float = 0.0
    seconds: float = 0.0
    outside: int = 0


def engine_counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in urls:
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


Plan = list[tuple[list[dict[str, str]], bool, str]]  # per request: messages, straight to an engine, which engine


async def warm_up_platform(
    client: httpx.AsyncClient, routers: list[str], urls: dict[str, str], model: str, auth: dict[str, str]
) -> None:
    """A request through each process (it discovers the publishers and subscribes), then a new long prompt straight
    to each engine, so that every subscription has heard its engine (block size learnt)."""
    warm = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 1}
    for router in routers:
        (await client.post(f"{router}/v1/chat/completions", json=warm, headers=auth)).raise_for_status()
    await asyncio.sleep(3.0)
    rng = random.Random(time.time_ns())
    for url in urls.values():
        text = f"warm-up {time.time_ns()} " + document(rng, 300)
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
        (await client.post(f"{url}/v1/chat/completions", json=body)).raise_for_status()
    await asyncio.sleep(1.0)


def platform_plan(mode: str, urls: dict[str, str], args: argparse.Namespace) -> Plan:
    """The mode's requests (fresh documents, tagged with the mode and the time): a document and a question each,
    `args.outside` of them sent straight to a random engine."""
    rng = random.Random(args.seed)
    tag = f"[platform {mode} {args.seed} {time.time_ns()}]"
    texts = [f"{tag} Document {i}. " + document(rng, 420) for i in range(args.docs)]
    return [
        (
            [
                {"role": "system", "content": texts[rng.randrange(args.docs)]},
                {"role": "user", "content": rng.choice(QUESTIONS)},
            ],
            rng.random() < args.outside,
            rng.choice(list(urls.values())),
        )
        for _ in range(args.requests)
    ]


async def run_platform_mode(
    mode: str,
    *,
    client: httpx.AsyncClient,
    routers: list[str],
    urls: dict[str, str],
    hub: KvEventsHub,
    args: argparse.Namespace,
) -> PlatformResult:
    auth = {"Authorization": f"Bearer {KEY}"}
    await warm_up_platform(client, routers, urls, args.model, auth)
    plan = platform_plan(mode, urls, args)
    by_url = {url: name for name, url in urls.items()}
    backend_url = {
        b["name"]: b["base_url"].rstrip("/")
        for b in (await client.get(f"{routers[0]}/api/backends/", headers=auth)).json()
    }
    result = PlatformResult(mode=mode)
    hits0, queries0 = engine_counters(list(urls.values()))
    t0 = time.perf_counter()
    first = next(iter(urls.values()))
    gate = asyncio.Semaphore(args.concurrency)

    async def one(i: int, messages: list[dict[str, str]], outside: bool, engine: str) -> None:
        async with gate:
            body = {"model": args.model, "messages": messages, "max_tokens": 1, "temperature": 0}
            if outside:  # a client (or another router) reaching an engine directly: the engines' cache changes
                result.outside += 1
                (await client.post(f"{engine}/v1/chat/completions", json=body)).raise_for_status()
                return
            tok = await client.post(f"{first}/tokenize", json={"model": args.model, "messages": messages})
            tok.raise_for_status()
            tokens = tok.json()["tokens"]
            keys = block_keys(tokens, args.block_size)
            usable = (len(tokens) - 1) // args.block_size
            held = {name: min(hub.matched_blocks(name, keys) or 0, usable) for name in urls}
            t = time.perf_counter()
            response = await client.post(f"{routers[i % 2]}/v1/chat/completions", json=body, headers=auth)
            elapsed = time.perf_counter() - t
            result.requests += 1
            if response.status_code != 200:
                result.failed += 1
                return
            result.latency_s.append(elapsed)
            chosen = by_url[backend_url[response.headers["x-router-backend"]]]
            result.per_backend[chosen] = result.per_backend.get(chosen, 0) + 1
            usage = response.json()["usage"]
            result.prompt_tokens += usage["prompt_tokens"]
            result.cached_tokens += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            best = max(held.values())
            result.best_tokens += best * args.block_size
            result.best_choice += held[chosen] == best

    await asyncio.gather(*(one(i, *item) for i, item in enumerate(plan)))
    result.seconds = time.perf_counter() - t0
    await asyncio.sleep(0.5)
    hits1, queries1 = engine_counters(list(urls.values()))
    result.engine_hits, result.engine_queries = hits1 - hits0, queries1 - queries0
    for pool in (await client.get(f"{routers[0]}/api/pools/", headers=auth)).json():
        for b in pool["backends"]:
            name = by_url.get(b["base_url"].rstrip("/"))
            if name is not None:
                result.estimated[name] = b.get("prefix_estimated_hit_ratio")
                result.events_blocks[name] = b.get("kv_events_blocks")
    return result


def platform_report(results: list[PlatformResult], args: argparse.Namespace) -> str:
    lines = [
        f"through the platform: two router processes (requests alternate), pool prefix_aware; docs {args.docs}, "
        f"requests {args.requests} per mode, {args.concurrency} at a time, {args.outside:.0%} of them straight to an "
        f"engine (not counted below), seed {args.seed}; engine cache {args.capacity} blocks of {args.block_size} "
        "tokens each",
        "",
        "| mode | hit rate (cached / prompt tokens) | engine counters | best choice | cached tokens missed vs best "
        "| router's estimated hit ratio | latency p50 / p90 | requests per backend | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lat = sorted(r.latency_s) or [0.0]
        split = " / ".join(str(r.per_backend.get(name, 0)) for name in sorted(r.estimated or r.per_backend))
        estimated = " / ".join("–" if v is None else f"{v:.0%}" for _, v in sorted(r.estimated.items()))
        lines.append(
            f"| {r.mode} | {r.cached_tokens / max(r.prompt_tokens, 1):.1%} "
            f"| {r.engine_hits / max(r.engine_queries, 1):.1%} | {r.best_choice}/{r.requests} "
            f"| {max(r.best_tokens - r.cached_tokens, 0)} | {estimated} "
            f"| {statistics.median(lat):.2f} / {lat[int(len(lat) * 0.9)]:.2f} s | {split} | {r.failed} |"
        )
    for r in results:
        if any(v is not None for v in r.events_blocks.values()):
            lines.append(f"\n{r.mode}: blocks in the platform's event indexes at the end: {r.events_blocks}")
    return "\n".join(lines)


async def platform_main(args: argparse.Namespace) -> None:
    ports = [int(p) for p in args.ports.split(",")]
    urls = {f"vllm-{p}": f"http://127.0.0.1:{p}" for p in ports}
    event_ports = [int(p) for p in args.event_ports.split(",")]
    if args.mock:
        engines = start_mock_engines(ports, event_ports, args.capacity)
        args.block_size = 16
    else:
        engines = start_engines(ports, event_ports, args.capacity) if args.start_engines else []
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            endpoints = {}
            for name, url in urls.items():
                endpoints[name] = endpoint_from_sources(url, (await client.get(f"{url}/kv_event_sources")).json())
            print("bench subscribing to", endpoints, flush=True)
            hub = KvEventsHub(max_blocks=100_000)
            hub.sync(endpoints)
            await asyncio.sleep(1.0)
            results = []
            for mode in args.platform_modes.split(","):
                routers, procs = start_routers(mode, list(urls.values()), args.redis_url, args.tokenize_timeout_ms)
                try:
                    result = await run_platform_mode(
                        mode, client=client, routers=routers, urls=urls, hub=hub, args=args
                    )
                finally:
                    for proc in procs:
                        proc.terminate()
                    for proc in procs:
                        proc.wait(timeout=60)
                print(
                    f"{mode}: hit rate {result.cached_tokens / max(result.prompt_tokens, 1):.1%}, "
                    f"best choice {result.best_choice}/{result.requests}, failed {result.failed}",
                    flush=True,
                )
                results.append(result)
            await hub.aclose()
    finally:
        stop_engines(engines)
    print()
    print(platform_report(results, args))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", default="18041,18042")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--capacity", type=int, default=48, help="engine KV blocks (--num-gpu-blocks-override)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--modes", default="round_robin,approximate x1,approximate x2,precise x1,precise x2")
    parser.add_argument("--platform", action="store_true", help="through the platform: two router processes")
    parser.add_argument("--platform-modes", default=",".join(PLATFORM_MODES))
    parser.add_argument("--start-engines", action="store_true", help="start (and stop) the two engines here")
    parser.add_argument("--concurrency", type=int, default=1, help="--platform: requests in flight")
    parser.add_argument(
        "--outside", type=float, default=0.0, help="--platform: share of requests sent straight to a random engine"
    )
    parser.add_argument("--mock", action="store_true", help="--platform against two bundled mock engines (a dry run)")
    parser.add_argument("--event-ports", default="5581,5582")
    parser.add_argument("--redis-url", default=os.environ.get("KV_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    parser.add_argument("--tokenize-timeout-ms", type=int, default=2000, help="ROUTER_KV_EVENTS_TOKENIZE_TIMEOUT_MS")
    args = parser.parse_args()
    if args.platform:
        await platform_main(args)
        return

    urls = {f"vllm-{p}": f"http://127.0.0.1:{p}" for p in args.ports.split(",")}
    async with httpx.AsyncClient(timeout=120) as client:
        endpoints = {}
        for name, url in urls.items():
            sources = (await client.get(f"{url}/kv_event_sources")).json()
            endpoints[name] = endpoint_from_sources(url, sources)
        print("subscribing to", endpoints, flush=True)
        hub = KvEventsHub(max_blocks=100_000)
        hub.sync(endpoints)
        await asyncio.sleep(1.0)  # let the SUB sockets connect (ZMQ drops what is published before)
        results = []
        for mode in args.modes.split(","):
            processes = int(mode.rsplit(" x", 1)[1]) if " x" in mode else 1
            result = await run_mode(
                mode,
                client=client,
                urls=urls,
                hub=hub,
                docs=args.docs,
                requests=args.requests,
                seed=args.seed,
                capacity=args.capacity,
                processes=processes,
                block_size=args.block_size,
                model=args.model,
            )
            print(
                f"{mode}: hit rate {result.cached_tokens / max(result.prompt_tokens, 1):.1%}, "
                f"exact {result.exact}/{result.requests}, phantom {result.phantom}, missed {result.missed}",
                flush=True,
            )
            results.append(result)
        stats = hub.stats()
        await hub.aclose()
    print()
    print(report(results, args, stats))


if __name__ == "__main__":
    asyncio.run(main())
