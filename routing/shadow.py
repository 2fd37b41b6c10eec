"""Shadow traffic: a share of a model's requests mirrored to another model, off the request path, and compared.

The choice is made in the request's preparation (`ShadowMirror.plan`, a dict lookup and a draw per shadow of
the model). A chosen request carries a `ShadowTicket`; for a stream, the ticket keeps the bytes the backend
sent (bounded by MAX_CAPTURE_BYTES). When the request's `Lifecycle` finishes (the client has its whole answer),
a successful primary is handed to the mirror, which is bounded and never waits for anything:

- at most `concurrency` mirrored requests run at once per process, and at most `queue_max` wait; beyond that a
  mirror is dropped (counted), never queued further, so a flood costs O(1) per request and no memory;
- a mirror is sent only when a backend of the shadow model has a free slot and no client request waits for one
  (the dispatcher's queue is empty): shadow traffic runs below every client class and is dropped first; it is
  sent once (no retry, no failover) and bounded in time (`timeout_s`);
- it goes through a `Lifecycle` of its own (backend slot, verdict for health and circuit breakers, a usage
  record under the principal `shadow`, with no key: no rate-limit reservation, nothing charged to the client);
- it is always sent without streaming (`stream` and `stream_options` removed); a streamed primary is compared
  on its assembled text.

The comparison (latency, token counts, and at temperature 0 whether the texts match) is tallied per (primary
model, shadow model) pair in process memory and added to the hour's `backends.ShadowComparison` row every
`flush_interval_s` by a background task (in a worker thread); admin shows it per model pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Counter

from backends.services import SHADOW_COUNTERS, shadow_comparisons_add
from backends.snapshot import ModelSnap, RegistrySnapshot
from core.db import run_db
from governance.priority import LOWEST, Flow
from routing.auth import Principal
from routing.dispatch import NO_CONTEXT, Dispatcher

if TYPE_CHECKING:
    from routing.exchange import Lifecycle
    from routing.gateway import Endpoint, PreparedRequest

logger = logging.getLogger(__name__)

SHADOW_PRINCIPAL = Principal(name="shadow", is_master=False)
"""Who shadow requests are recorded as (no key: nothing charged, no limit applies)."""
SHADOW_FLOW = Flow(SHADOW_PRINCIPAL.name, LOWEST)
"""Shadow requests run in the lowest priority class."""
MAX_CAPTURE_BYTES = 1 << 20
"""Streamed bytes of a mirrored primary kept for the comparison; beyond, its text is not compared."""
_LOG_EVERY_S = 60.0
SHADOW_REQUESTS = Counter(
    "llm_shadow_requests",
    "Shadow (mirrored) requests by model pair and outcome: ok, error (not 200), dropped (queue full, no free slot).",
    ["primary", "shadow", "outcome"],
)

Pair = tuple[str, str]
Write = Callable[[datetime, Mapping[Pair, Mapping[str, float]]], int]


class ShadowTicket:
    """A request chosen for mirroring: its shadow models, and its streamed bytes (bounded) for the comparison."""

    __slots__ = ("chunks", "mirror", "size", "targets", "truncated")

    def __init__(self, mirror: ShadowMirror, targets: tuple[ModelSnap, ...]) -> None:
        self.mirror = mirror
        self.targets = targets
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        """Keep a streamed chunk of the primary's answer (bounded)."""
        if self.truncated:
            return
        self.size += len(chunk)
        if self.size > MAX_CAPTURE_BYTES:
            self.truncated = True
            self.chunks = []
            return
        self.chunks.append(chunk)

    def submit(self, lc: Lifecycle) -> None:
        """The primary is over: mirror it if it succeeded (O(1) per shadow model, no I/O)."""
        self.mirror.submit(self, lc)


@dataclass(frozen=True, slots=True)
class ShadowJob:
    """One mirrored request, with what its comparison needs of the primary."""

    prepared: PreparedRequest
    target: ModelSnap
    request_id: str
    primary_body: bytes  # the JSON answer, or the SSE bytes of a stream (empty when not kept)
    primary_latency_ms: float
    primary_prompt_tokens: int
    primary_completion_tokens: int

    @property
    def pair(self) -> Pair:
        """(primary model, shadow model): the model that served the client, by public name, and the shadow."""
        return (self.prepared.model.name, self.target.name)


class ShadowMirror:
    """Mirrors chosen requests to their shadow models, bounded per process; see the module docstring."""

    def __init__(
        self,
        *,
        concurrency: int = 2,
        queue_max: int = 16,
        timeout_s: float = 30.0,
        flush_interval_s: float = 5.0,
        write: Write | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.concurrency = max(0, concurrency)
        self.queue_max = max(0, queue_max)
        self.timeout_s = timeout_s
        self.flush_interval_s = flush_interval_s
        self.rand = rand
        self._write: Write = write or _write_comparisons
        self.lifecycle: Callable[[Endpoint, str, float, Principal | None], Lifecycle] | None = None
        self.dispatcher: Dispatcher | None = None
        self.queue: deque[ShadowJob] = deque()
        self.running = 0
        self.tallies: dict[Pair, dict[str, float]] = {}
        self.totals: dict[str, int] = dict.fromkeys(("mirrored", "errors", "dropped", "compared", "matched"), 0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._last_log = 0.0

    @classmethod
    def from_settings(cls) -> ShadowMirror:
        """A mirror configured by ROUTER_SHADOW_CONCURRENCY, _QUEUE, _TIMEOUT_S and _FLUSH_S."""
        from django.conf import settings

        return cls(
            concurrency=settings.ROUTER_SHADOW_CONCURRENCY,
            queue_max=settings.ROUTER_SHADOW_QUEUE,
            timeout_s=settings.ROUTER_SHADOW_TIMEOUT_S,
            flush_interval_s=settings.ROUTER_SHADOW_FLUSH_S,
        )

    def attach(
        self, *, dispatcher: Dispatcher, lifecycle: Callable[[Endpoint, str, float, Principal | None], Lifecycle]
    ) -> None:
        """Use this gateway's dispatcher and lifecycle factory (done by the gateway)."""
        self.dispatcher = dispatcher
        self.lifecycle = lifecycle

    # --- the request path -----------------------------------------------------------------------------------

    def plan(self, registry: RegistrySnapshot, model: ModelSnap) -> ShadowTicket | None:
        """Whether this request for `model` is mirrored, and to which models (each shadow drawn on its own)."""
        mirrors = registry.shadows.get(model.name)
        if not mirrors or not self.concurrency:
            return None
        rand = self.rand
        targets = tuple(m.target for m in mirrors if rand() < m.share)
        return ShadowTicket(self, targets) if targets else None

    def submit(self, ticket: ShadowTicket, lc: Lifecycle) -> None:
        """Queue the mirrors of a finished primary (only a 200 is mirrored); drop them when the queue is full."""
        prepared = lc.prepared
        if prepared is None or lc.status != 200 or lc.backend is None or not prepared.endpoint.tokens:
            return  # only successes are mirrored, and not the tokenizer (no generation to compare)
        if prepared.stream:
            body = b"" if ticket.truncated else b"".join(ticket.chunks)
        else:
            body = lc.response.content if lc.response is not None else b""
        latency_ms = (time.perf_counter() - lc.started) * 1000.0
        for target in ticket.targets:
            job = ShadowJob(
                prepared=prepared,
                target=target,
                request_id=f"{lc.request_id}-shadow",
                primary_body=body,
                primary_latency_ms=latency_ms,
                primary_prompt_tokens=lc.prompt_tokens,
                primary_completion_tokens=lc.completion_tokens,
            )
            if self.running < self.concurrency:
                self._start(job)
            elif len(self.queue) < self.queue_max:
                self.queue.append(job)
            else:
                self._drop(job)

    def _drop(self, job: ShadowJob) -> None:
        self._tally(job.pair)["dropped"] += 1
        self.totals["dropped"] += 1
        SHADOW_REQUESTS.labels(*job.pair, "dropped").inc()

    def _start(self, job: ShadowJob) -> None:
        loop = asyncio.get_running_loop()
        self.running += 1
        task = loop.create_task(self._work(job), name="shadow-mirror")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._flusher is None or self._flusher.done() or self._loop is not loop:
            self._loop = loop
            self._flusher = loop.create_task(self._flush_loop(), name="shadow-flusher")

    # --- the mirrors ----------------------------------------------------------------------------------------

    async def _work(self, job: ShadowJob | None) -> None:
        try:
            while job is not None:
                try:
                    await self._mirror(job)
                except Exception:
                    logger.exception("shadow request %s failed unexpectedly", job.request_id)
                job = self.queue.popleft() if self.queue else None
        finally:
            self.running -= 1

    async def _mirror(self, job: ShadowJob) -> None:
        """Send one mirror through a Lifecycle of its own (once, bounded in time) and tally the comparison."""
        factory, dispatcher = self.lifecycle, self.dispatcher
        assert factory is not None and dispatcher is not None, "the gateway attaches itself first"
        primary = job.prepared
        target = job.target
        # Below every client: only a free slot, and only when no client request waits for one.
        backend, _ = dispatcher.pick(target, primary.registry, set(), NO_CONTEXT)
        if backend is None or dispatcher.waiting:
            self._drop(job)
            return
        data = {k: v for k, v in primary.data.items() if k not in ("stream", "stream_options")}
        data["model"] = target.served_name
        body = orjson.dumps(data)
        prepared = replace(
            primary,
            data=data,
            model=target,
            requested=target.name,
            stream=False,
            strip_usage=False,
            strip_continuous_usage=False,
            body=body,
            shadow=None,
            split_from="",
        )
        lc = factory(primary.endpoint, job.request_id, time.perf_counter(), SHADOW_PRINCIPAL)
        lc.max_attempts = 1  # never retried nor failed over
        error: BaseException | None = None
        result: Any = None
        try:
            await lc.admit(prepared, len(body))  # no key: no access check, no reservation
            lc.flow = SHADOW_FLOW  # the lowest class (vLLM's lowest priority on pools running its scheduler)
            async with asyncio.timeout(self.timeout_s):
                response = await lc.open()
                if response.status_code != 200:
                    raise await lc.upstream_error()
                lc.verdict(True)
                result = orjson.loads(response.content)
                lc.take_usage(result.get("usage") if isinstance(result, dict) else None)
        except asyncio.CancelledError as exc:
            await lc.finish(exc)
            raise
        except Exception as exc:
            error = exc
            result = None
        await lc.finish(error)
        self._compare(job, lc, result)

    def _compare(self, job: ShadowJob, lc: Lifecycle, result: Any) -> None:
        tally = self._tally(job.pair)
        tally["mirrored"] += 1
        self.totals["mirrored"] += 1
        if lc.status != 200 or not isinstance(result, dict):
            tally["errors"] += 1
            self.totals["errors"] += 1
            SHADOW_REQUESTS.labels(*job.pair, "error").inc()
            return
        SHADOW_REQUESTS.labels(*job.pair, "ok").inc()
        tally["primary_latency_ms_sum"] += job.primary_latency_ms
        tally["shadow_latency_ms_sum"] += (time.perf_counter() - lc.started) * 1000.0
        tally["primary_completion_tokens"] += job.primary_completion_tokens
        tally["shadow_completion_tokens"] += lc.completion_tokens
        tally["prompt_tokens_delta"] += lc.prompt_tokens - job.primary_prompt_tokens
        primary = job.prepared
        if not greedy(primary.data) or not job.primary_body:
            return
        endpoint = primary.endpoint.name
        mine = answer_texts(endpoint, job.primary_body, stream=primary.stream)
        theirs = answer_texts(endpoint, result)
        if mine is None or theirs is None:
            return
        tally["compared"] += 1
        self.totals["compared"] += 1
        if mine == theirs:
            tally["matched"] += 1
            self.totals["matched"] += 1

    def _tally(self, pair: Pair) -> dict[str, float]:
        tally = self.tallies.get(pair)
        if tally is None:
            tally = self.tallies[pair] = dict.fromkeys(SHADOW_COUNTERS, 0.0)
        return tally

    # --- the rollup -----------------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.aflush()

    async def aflush(self) -> int:
        """Add the tallies to the hour's rows (in the database thread); on failure keep them for the next flush.
        One flush at a time: a flush asked for while another writes waits for it, so that it returns only once
        everything tallied before it is written (the background flush takes the tallies before writing them)."""
        async with self._lock():
            return await self._flush()

    def _lock(self) -> asyncio.Lock:
        """The flush lock of the running loop (a new one on a new loop: a lock belongs to the loop it waited on)."""
        loop = asyncio.get_running_loop()
        if self._flush_lock is None or self._flush_lock[0] is not loop:
            self._flush_lock = (loop, asyncio.Lock())
        return self._flush_lock[1]

    async def _flush(self) -> int:
        if not self.tallies:
            return 0
        tallies, self.tallies = self.tallies, {}
        hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        try:
            return await run_db(functools.partial(self._write, hour, tallies))
        except Exception as exc:
            for pair, tally in tallies.items():  # merged back: bounded by the number of model pairs
                mine = self._tally(pair)
                for k, v in tally.items():
                    mine[k] += v
            now = time.monotonic()
            if now - self._last_log >= _LOG_EVERY_S:
                self._last_log = now
                logger.warning("shadow comparisons: cannot write (%s); kept in memory", exc)
            return 0

    def stats(self) -> dict[str, int]:
        """This process's mirror: running, queued, and the totals since it started."""
        return {"running": self.running, "queued": len(self.queue), **self.totals}

    async def aclose(self) -> None:
        """Stop the mirrors in flight and the flusher; write what is tallied (lifespan shutdown)."""
        self.queue.clear()
        tasks = [t for t in (*self._tasks, self._flusher) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._flusher = None
        await self.aflush()


def _write_comparisons(hour: datetime, tallies: Mapping[Pair, Mapping[str, float]]) -> int:
    return shadow_comparisons_add(hour=hour, tallies=tallies)


def greedy(data: Mapping[str, Any]) -> bool:
    """Whether the request asked for temperature 0 (its answer is then expected to be reproducible)."""
    temperature = data.get("temperature")
    return isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0


def answer_texts(endpoint: str, answer: bytes | dict[str, Any], *, stream: bool = False) -> dict[int, str] | None:
    """The text of each choice of a chat or text completion (a JSON answer, or the SSE bytes of a stream).

    None when there is nothing to compare (another endpoint, an answer that cannot be read).
    """
    if endpoint == "chat.completions":
        member = "delta" if stream else "message"
    elif endpoint == "completions":
        member = ""
    else:
        return None
    texts: dict[int, list[str]] = {}
    try:
        if stream:
            assert isinstance(answer, bytes)
            events = [
                orjson.loads(line[5:])
                for line in answer.split(b"\n")
                if line.startswith(b"data:") and line[5:].strip() not in (b"[DONE]", b"")
            ]
        else:
            events = [answer if isinstance(answer, dict) else orjson.loads(answer)]
        for event in events:
            for choice in event.get("choices") or ():
                part = (choice.get(member) or {}).get("content") if member else choice.get("text")
                if isinstance(part, str):
                    texts.setdefault(int(choice.get("index", 0)), []).append(part)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError, AssertionError):
        return None
    return {index: "".join(parts) for index, parts in texts.items()}
