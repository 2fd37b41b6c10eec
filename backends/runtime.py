"""Runtime view of backends across web processes, the reading side (docs: routing/runtime.py writes it).

Every web process publishes its dispatcher's state to Redis under `KEY_PREFIX + <process id>`
(routing.runtime.RuntimePublisher); admin, the management API and /metrics merge those views here. This module
sits in the backends app so that they need not import the routing hot path: the process's own, unpublished view
comes from the source that routing.runtime registers with `runtime_local_source_set` when it is imported.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

import orjson

logger = logging.getLogger(__name__)

RuntimeView = dict[str, dict[str, Any]]

_local_source: Callable[[], list[RuntimeView]] = list


def runtime_local_source_set(source: Callable[[], list[RuntimeView]]) -> None:
    """Register how to read this process's own views (the live dispatchers'); set by routing.runtime."""
    global _local_source
    _local_source = source


def local_views() -> list[RuntimeView]:
    """The runtime stats of every dispatcher alive in this process (none when routing was never imported)."""
    return _local_source()


KEY_PREFIX = "llm:runtime:"
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"
_CIRCUIT_RANK = {"closed": 0, "half_open": 1, "open": 2}


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
                    "kv_events_blocks": None,
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
            # Each process hears the engine's KV-cache events itself: the largest index is the most complete.
            events = stats.get("kv_events_blocks")
            if events is not None and (entry["kv_events_blocks"] is None or events > entry["kv_events_blocks"]):
                entry["kv_events_blocks"] = events
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
