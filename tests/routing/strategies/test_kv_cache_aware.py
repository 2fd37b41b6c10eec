"""KV-cache-aware routing avoids the backend whose vLLM metrics show a queue or a full cache."""

import random

from backends.mock_vllm import MockServer
from routing.health import MetricsScraper, parse_vllm_metrics
from routing.strategies import BackendMetrics, KvCacheAware, RoutingStats
from tests.factories import backend_snap


def test_avoids_backend_with_a_queue() -> None:
    # given b1 whose vLLM has 3 requests waiting, b2 busy but not queueing
    backends = [backend_snap("b1"), backend_snap("b2")]
    stats = RoutingStats(
        metrics={
            "b1": BackendMetrics(waiting=3, running=8, kv_cache_usage=0.5),
            "b2": BackendMetrics(waiting=0, running=10, kv_cache_usage=0.6),
        }
    )
    # then b2 is chosen
    assert KvCacheAware(random.Random(0)).select(backends, stats).name == "b2"


def test_avoids_full_kv_cache_and_falls_back_to_in_flight_without_metrics() -> None:
    backends = [backend_snap("b1"), backend_snap("b2")]
    full = RoutingStats(
        metrics={
            "b1": BackendMetrics(running=2, kv_cache_usage=0.95),
            "b2": BackendMetrics(running=3, kv_cache_usage=0.1),
        }
    )
    assert KvCacheAware().select(backends, full).name == "b2"
    no_metrics = RoutingStats(in_flight={"b1": 0, "b2": 4})
    assert KvCacheAware().select(backends, no_metrics).name == "b1"


def test_parses_vllm_prometheus_text() -> None:
    text = b"""# HELP vllm:num_requests_waiting Number of requests waiting.
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:num_requests_running{engine="0",model_name="m"} 5.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 9.0
"""
    metrics = parse_vllm_metrics(text, 1.0)
    assert (metrics.waiting, metrics.running, metrics.kv_cache_usage) == (3.0, 5.0, 0.42)


async def test_scraper_reads_the_mock_metrics() -> None:
    import httpx

    with MockServer(num_requests_waiting=4, kv_cache_usage_perc=0.7) as busy, MockServer() as idle:
        scraper = MetricsScraper()
        async with httpx.AsyncClient() as client:
            await scraper.scrape_once(
                [backend_snap("busy", base_url=busy.url), backend_snap("idle", base_url=idle.url)], client
            )
        fresh = scraper.fresh()
    assert fresh["busy"].waiting == 4 and fresh["busy"].kv_cache_usage == 0.7
    assert fresh["idle"].waiting == 0
    assert (
        KvCacheAware().select([backend_snap("busy"), backend_snap("idle")], RoutingStats(metrics=fresh)).name == "idle"
    )
