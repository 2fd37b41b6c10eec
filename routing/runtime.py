"""Runtime view of backends across web processes: in-flight requests, circuits, latency, vLLM load.

Each process knows its own dispatcher's state. With `REDIS_URL` set, every web process publishes that state
to Redis every `ROUTER_RUNTIME_PUBLISH_S` (key per process, short TTL, so a dead process disappears); admin
and the management API sum the views. Without Redis, they show the state of the process serving them, which
in `make run` is the one process that also serves /v1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

import orjson

from routing.dispatch import LIVE_DISPATCHERS, Dispatcher

logger = logging.getLogger(__name__)

KEY_PREFIX = "llm:runtime:"
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"
_CIRCUIT_RANK = {"closed": 0, "half_open": 1, "open": 2}


def local_views() -> list[dict[str, dict[str, Any]]]:
    """The runtime stats of every dispatcher alive in this process."""
    return [d.runtime_stats() for d in list(LIVE_DISPATCHERS)]


def merge_views(views: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Combine per-process views: in-flight summed, worst circuit, mean latency, freshest vLLM figures."""
    merged: dict[str, dict[str, Any]] = {}
    latencies: dict[str, list[float]] = {}
    for view in views:
        for name, stats in view.items():
            entry = merged.setdefault(
                name,
                {
                    "in_flight": 0,
                    "circuit": "closed",
                    "circuits_open": 0,
                    "latency_ms": None,
                    "processes": 0,
                    "vllm_waiting": None,
                    "vllm_running": None,
                    "kv_cache_usage": None,
                    "engine_prefix_cache_hit_rate": None,
                    "prefix_index_blocks": None,
                    "prefix_estimated_hit_ratio": None,
                },
            )
            entry["processes"] += 1
            entry["in_flight"] += int(stats.get("in_flight") or 0)
            circuit = str(stats.get("circuit") or "closed")
            if circuit != "closed":
                entry["circuits_open"] += 1
            if _CIRCUIT_RANK.get(circuit, 0) > _CIRCUIT_RANK.get(entry["circuit"], 0):
                entry["circuit"] = circuit
            if stats.get("latency_ms") is not None:
                latencies.setdefault(name, []).append(float(stats["latency_ms"]))
            for key in ("vllm_waiting", "vllm_running", "kv_cache_usage", "engine_prefix_cache_hit_rate"):
                if stats.get(key) is not None:
                    entry[key] = stats[key]
            # Prefix indexes are shared between processes (Redis): the largest is the best estimate.
            blocks = stats.get("prefix_index_blocks")
            if blocks is not None and (entry["prefix_index_blocks"] is None or blocks > entry["prefix_index_blocks"]):
                entry["prefix_index_blocks"] = blocks
                entry["prefix_estimated_hit_ratio"] = stats.get("prefix_estimated_hit_ratio")
    for name, values in latencies.items():
        merged[name]["latency_ms"] = round(sum(values) / len(values), 2)
    return merged


def runtime_stats_collect(redis_url: str | None = None) -> dict[str, dict[str, Any]]:
    """Every web process's view merged (Redis when configured, plus this process)."""
    from django.conf import settings

    url = redis_url if redis_url is not None else settings.REDIS_URL
    views = local_views()
    if url:
        try:
            import redis

            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            own = KEY_PREFIX + PROCESS_ID
            keys = [k for k in client.scan_iter(match=KEY_PREFIX + "*", count=200) if k.decode() != own]
            for raw in client.mget(keys) if keys else []:
                if raw:
                    views.append(orjson.loads(raw))
        except Exception as exc:  # Redis down: show what this process knows
            logger.warning("cannot read runtime stats from Redis: %s", exc)
    return merge_views(views)


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
        loop = asyncio.get_running_loop()
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
