"""Runtime view of backends across web processes: in-flight requests, circuits, latency, vLLM load.

Each process knows its own dispatcher's state. With `REDIS_URL` set, every web process publishes that state
to Redis every `ROUTER_RUNTIME_PUBLISH_S` (key per process, short TTL, so a dead process disappears); admin
and the management API sum the views. Without Redis, they show the state of the process serving them, which
in `make run` is the one process that also serves /v1.
"""

from __future__ import annotations

# The reading side (merge, collect) is backends.runtime, which admin and /metrics use without importing routing.
import asyncio
import contextlib
import logging
from typing import Any

import orjson

from backends.runtime import KEY_PREFIX, PROCESS_ID, merge_views, runtime_local_source_set, runtime_stats_collect
from core.aio import running_loop
from routing.dispatch import LIVE_DISPATCHERS, Dispatcher

__all__ = ["KEY_PREFIX", "PROCESS_ID", "RuntimePublisher", "local_views", "merge_views", "runtime_stats_collect"]

logger = logging.getLogger(__name__)


def local_views() -> list[dict[str, dict[str, Any]]]:
    """The runtime stats of every dispatcher alive in this process."""
    return [d.runtime_stats() for d in list(LIVE_DISPATCHERS)]


runtime_local_source_set(local_views)


class RuntimePublisher:
    """Publishes one dispatcher's runtime stats to Redis periodically (started lazily on the serving loop)."""

    def __init__(self, dispatcher: Dispatcher, *, redis_url: str, interval_s: float = 2.0) -> None:
        self.dispatcher = dispatcher
        self.redis_url = redis_url
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def ensure_running(self) -> None:
        """Start publishing on the running loop if not already."""
        if not self.redis_url:
            return
        loop = running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._task = loop.create_task(self._run(), name="runtime-publisher")

    async def _run(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.redis_url, socket_timeout=1, socket_connect_timeout=1)
        key = KEY_PREFIX + PROCESS_ID
        ttl = max(5, int(self.interval_s * 5))
        try:
            while True:
                try:
                    await client.set(key, orjson.dumps(self.dispatcher.runtime_stats()), ex=ttl)
                except Exception as exc:  # Redis down: try again next tick
                    logger.debug("runtime publish failed: %s", exc)
                await asyncio.sleep(self.interval_s)
        finally:
            # Leave the merged view at once rather than when the key expires.
            with contextlib.suppress(Exception):
                await client.delete(key)
            await client.aclose()

    async def aclose(self) -> None:
        """Stop publishing."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
