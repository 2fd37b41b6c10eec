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
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
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
        if mode == "round_robin":
            scores = dict.fromkeys(names, 0)
            chosen = names[i % len(names)]
        else:
            if mode.startswith("precise"):
                scores = {name: hub.matched_blocks(name, keys) or 0 for name in names}
            else:
                memory = memories[process]
                scores = {name: memory[name].matched(keys) for name in names}
            best = max(scores.values())
            tied = [n for n in names if scores[n] == best]
            fewest = min(sent[process][n] for n in tied)
            chosen = tie_rng.choice([n for n in tied if sent[process][n] == fewest])
        sent[process][chosen] += 1
        result.per_backend[chosen] += 1
        response = await client.post(
            f"{urls[chosen]}/v1/chat/completions",
            json={"model": model, "messages": messages, "max_tokens": 1, "temperature": 0},
        )
        response.raise_for_status()
        usage = response.json()["usage"]
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        predicted = min(scores[chosen], usable) * block_size
        result.requests += 1
        result.prompt_tokens += usage["prompt_tokens"]
        result.cached_tokens += cached
        if predicted == cached:
            result.exact += 1
        elif predicted > cached:
            result.phantom += 1
        else:
            result.missed += 1
        if mode.startswith("approximate"):
            memories[process][chosen].add(keys)
        if mode.startswith("precise"):
            index = hub.index(chosen)
            t = time.perf_counter()
            full = len(tokens) // block_size
            # the index has no change notification: poll it (1 ms, at most 1 s)
            while index is not None and index.matched_blocks(keys) < full and time.perf_counter() - t < 1.0:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            result.event_lag_ms.append((time.perf_counter() - t) * 1000)
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
    args = parser.parse_args()

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
