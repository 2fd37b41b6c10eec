"""Execution of a batch inside a Celery worker: every line through the router's own request lifecycle.

A `Gateway` built as the web processes build it (`Gateway.from_settings`) gives each line the same steps as live
traffic: validation and model resolution (`prepare`), admission against the key's limits, the dispatcher (strategy,
retries, failover, circuit breakers), the verdict, a usage record and the settlement (`Lifecycle`). Batches yield to
live traffic: every line runs in the lowest priority class (`batch`: last in a full pool's admission queue, first
shed, and vLLM's lowest `priority` on pools running its priority scheduler), at most BATCH_MAX_CONCURRENCY_PER_POOL
lines of a pool run at once in a worker, and none starts while the pool's engines report queued requests (vLLM's
`num_requests_waiting`, scraped by the dispatcher) or while the dispatcher answers 429 (every backend at its limit).
A 429 from the key's limits waits and retries the line.

Durability: lines are claimed with a lease (renewed while they run) and each result is written to its row before
the worker moves on; a worker that dies leaves `running` lines whose lease runs out and are claimed again by the
next runner, while `done` lines are never run again. A line's usage record is written in the same transaction as
its result, and only by the claim that wins (`services.line_finish`): a line is charged exactly once, however many
workers died or raced on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from batches import services
from batches.models import FINAL_STATUSES, Batch, BatchLine, BatchStatus, LineState
from batches.selectors import batch_principal_get
from core.db import adb_connections_close
from core.errors import APIError
from governance.auth import Principal
from governance.events import UsageEvent
from governance.priority import LOWEST
from routing.gateway import ENDPOINTS, Gateway

logger = logging.getLogger(__name__)

LIMIT_CODES = frozenset({"rate_limit_exceeded", "daily_budget_exceeded", "backend_capacity"})
"""429 codes that mean "not now": the line waits and is retried, it does not fail."""
MAX_WAIT_S = 30.0


def _retry_after(exc: APIError) -> float:
    for name, value in exc.headers:
        if name.lower() == b"retry-after":
            with contextlib.suppress(ValueError):
                return min(MAX_WAIT_S, max(0.2, float(value)))
    return 1.0


class LineUsage:
    """The usage sink of one line's lifecycle: it keeps the event, written with the line's result (not buffered)."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event: UsageEvent | None = None

    def record(self, event: UsageEvent) -> None:
        """Keep the event (the lifecycle records once)."""
        self.event = event


class BatchRunner:
    """Runs one batch's lines until none is left, the batch is cancelled or it expires."""

    def __init__(self, gateway: Gateway, batch_id: str) -> None:
        self.gateway = gateway
        self.batch_id = batch_id
        self.concurrency = max(1, settings.BATCH_MAX_CONCURRENCY_PER_POOL)
        self.lease_s = max(1.0, settings.BATCH_LINE_LEASE_S)
        self.busy_waiting = settings.BATCH_BACKOFF_QUEUE_DEPTH
        self.pools: dict[str, asyncio.Semaphore] = {}
        self.running: dict[int, BatchLine] = {}
        self.stop = asyncio.Event()
        self.principal: Principal | None = None
        self.endpoint = "/v1/chat/completions"

    async def run(self) -> str | None:
        """Run the batch; the final status it reached (None when it stopped without finishing it)."""
        batch = await sync_to_async(Batch.objects.filter(pk=self.batch_id).first)()
        if batch is None or batch.is_final:
            return batch.status if batch else None
        self.endpoint = batch.endpoint
        self.principal = await sync_to_async(batch_principal_get)(batch=batch)
        if self.principal is None:
            await sync_to_async(services.batch_fail)(
                batch_id=self.batch_id, code="invalid_api_key", message="The batch's API key was revoked or expired."
            )
            return BatchStatus.FAILED
        tasks: set[asyncio.Task[None]] = set()
        final: str | None = None
        last_renew = 0.0
        while True:
            batch = await sync_to_async(Batch.objects.get)(pk=self.batch_id)
            if batch.status in FINAL_STATUSES:
                break
            if batch.status == BatchStatus.FINALIZING:  # its last runner died while finalizing
                final = (
                    BatchStatus.CANCELLED
                    if batch.cancelling_at
                    else BatchStatus.EXPIRED
                    if services.batch_expired(batch=batch)
                    else BatchStatus.COMPLETED
                )
                break
            if batch.status == BatchStatus.CANCELLING:
                self.stop.set()
                final = BatchStatus.CANCELLED
            elif services.batch_expired(batch=batch):
                self.stop.set()
                final = BatchStatus.EXPIRED
            now = time.monotonic()
            if now - last_renew >= self.lease_s / 3:
                last_renew = now
                await sync_to_async(services.batch_runner_lease)(batch_id=self.batch_id, seconds=self.lease_s)
                await sync_to_async(services.lines_lease_renew)(line_ids=list(self.running), lease_s=self.lease_s)
            if not self.stop.is_set():
                room = 2 * self.concurrency - len(tasks)
                if room > 0:
                    claimed = await sync_to_async(services.lines_claim)(
                        batch_id=self.batch_id, limit=room, lease_s=self.lease_s
                    )
                    for line in claimed:
                        self.running[line.pk] = line
                        task = asyncio.create_task(self._line(line))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            if not tasks:
                if self.stop.is_set():
                    break
                left = await sync_to_async(
                    BatchLine.objects.filter(batch_id=self.batch_id).exclude(state=LineState.DONE).exists
                )()
                if not left:
                    final = BatchStatus.COMPLETED
                    break
                await asyncio.sleep(min(1.0, self.lease_s / 4))  # lines leased by another (maybe dead) worker
                continue
            await asyncio.wait(tasks, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        if final is not None:
            await sync_to_async(services.batch_finalize)(batch_id=self.batch_id, final=final)
        return final

    async def _line(self, line: BatchLine) -> None:
        try:
            await self._execute(line)
        except Exception:
            logger.exception("batch %s line %s failed unexpectedly", self.batch_id, line.index)
            await sync_to_async(services.line_finish)(
                line=line,
                request_id="",
                status_code=500,
                response=None,
                error={"code": "internal_error", "message": "Internal error while running this request."},
            )
        finally:
            self.running.pop(line.pk, None)

    def _pool_busy(self, pool: str, registry: Any) -> bool:
        """Whether live traffic queues in the pool's engines (scraped vLLM waiting requests)."""
        pool_snap = registry.pools.get(pool)
        if pool_snap is None:
            return False
        stats = self.gateway.dispatcher.runtime_stats()
        waiting = 0.0
        for backend in pool_snap.backends:
            value = stats.get(backend.name, {}).get("vllm_waiting")
            waiting += float(value) if isinstance(value, int | float) else 0.0
        return waiting >= self.busy_waiting > 0

    async def _wait(self, seconds: float) -> bool:
        """Sleep, unless the batch stops first; False when it stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        return not self.stop.is_set()

    async def _execute(self, line: BatchLine) -> None:
        gateway = self.gateway
        endpoint = ENDPOINTS[self.endpoint]
        request_id = uuid.uuid4().hex
        lc = gateway.lifecycle(endpoint, request_id, time.perf_counter(), self.principal, transport="batch")
        usage = LineUsage()
        lc.usage_sink = usage  # written with the result by line_finish, once: not through the buffered writer
        error: APIError | None = None
        result: dict[str, Any] | None = None
        data = dict(line.body)
        data["stream"] = False
        data["priority"] = LOWEST.value  # batch work runs in the lowest class, whatever the line asks for
        try:
            prepared = await gateway.prepare(endpoint, data)
            semaphore = self.pools.setdefault(prepared.model.pool, asyncio.Semaphore(self.concurrency))
            async with semaphore:
                while self._pool_busy(prepared.model.pool, prepared.registry):
                    if not await self._wait(settings.BATCH_BACKOFF_S):
                        break
                while not self.stop.is_set():
                    try:
                        if lc.reservation is None:
                            await lc.admit(prepared, len(prepared.body))
                        response = await lc.open()
                        break
                    except APIError as exc:
                        if exc.status != 429 or str(exc.code) not in LIMIT_CODES:
                            raise
                        await self._wait(_retry_after(exc))
                if self.stop.is_set() and lc.response is None:  # never sent: given back, nothing to record
                    if lc.reservation is not None and lc.limiter is not None:
                        await lc.limiter.settle(lc.reservation, 0)
                    await sync_to_async(services.line_release)(line=line)
                    return
                if response.status_code != 200:
                    raise await lc.upstream_error()
                lc.verdict(True)
                try:
                    result = orjson.loads(response.content)
                    result["model"] = prepared.requested
                except (orjson.JSONDecodeError, TypeError):
                    raise APIError(
                        502,
                        "The backend answered 200 with a body that is not JSON.",
                        type="server_error",
                        code="backend_error",
                    ) from None
                lc.take_usage(result.get("usage"))
        except APIError as exc:
            error = exc
        except BaseException as exc:
            await lc.finish(exc)
            raise
        await lc.finish(error)
        if error is not None:
            payload = error.payload()
            await sync_to_async(services.line_finish)(
                line=line,
                request_id=request_id,
                status_code=error.status,
                response=payload,
                error=None,
                prompt_tokens=lc.prompt_tokens,
                completion_tokens=lc.completion_tokens,
                usage=usage.event,
            )
            return
        await sync_to_async(services.line_finish)(
            line=line,
            request_id=request_id,
            status_code=200,
            response=result,
            error=None,
            prompt_tokens=lc.prompt_tokens,
            completion_tokens=lc.completion_tokens,
            usage=usage.event,
        )


async def batch_run(batch_id: str, *, gateway: Gateway | None = None) -> str | None:
    """Run a batch with a gateway built from settings (closed at the end, its usage records flushed)."""
    own = gateway is None
    gw = gateway if gateway is not None else Gateway.from_settings(None)
    try:
        runner = BatchRunner(gw, batch_id)
        return await runner.run()
    finally:
        if own:
            await gw.shadow.aclose()  # mirrors of the batch's lines still running are dropped, their tallies kept
            close = getattr(gw.usage, "aclose", None)
            if close is not None:
                await close()
            if gw.publisher is not None:
                await gw.publisher.aclose()
            await gw.registry.aclose()
            if gw.keys is not None:
                await gw.keys.aclose()
            await adb_connections_close()  # the database thread's connection (core.db), as at a web process's end
            await gw.dispatcher.aclose()


def batch_run_sync(batch_id: str) -> str | None:
    """Run a batch on a new event loop (a Celery task)."""
    return asyncio.run(batch_run(batch_id))


def batches_resume() -> list[str]:
    """Hand to a worker every batch whose runner died (its lease ran out)."""
    from batches.selectors import batches_needing_runner

    ids = batches_needing_runner(now=timezone.now())
    for batch_id in ids:
        services.batch_enqueue(batch_id=batch_id)
    return ids
