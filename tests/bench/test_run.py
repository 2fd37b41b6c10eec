"""bench/run.py's pure parts: the peer's figures per placement (pairing by round, the CPU multiple, the table)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.run import PEER, evaluate, peer_tables, summarize


def _run(rnd: int, target: str, placement: str, rate: float, cpu_ms: float | None) -> dict[str, Any]:
    return {
        "scenario": "chat c64",
        "kind": "chat",
        "target": target,
        "placement": placement,
        "round": rnd,
        "rate": rate,
        "errors": 0,
        "counts_equal": True,
        "client_sent": 100,
        "backend_requests": 100,
        "other_load_cores": 0.1,
        "latency_ms": {"p50": 1.0, "p99": 2.0},
        "proxy_cpu_ms_per_request": cpu_ms,
        "proxy_core_util": 0.5,
        "platform_core_util": 0.5,
        "mock_core_util": 0.2,
        "client_core_util": 0.1,
    }


@pytest.fixture
def two_rounds() -> list[dict[str, Any]]:
    # round 0: platform 0.3 / peer 0.1 ms (3x); round 1: 0.2 / 0.2 ms (1x); direct 1,000 then 2,000 req/s
    return [
        _run(0, "direct", "shared", 1000.0, None),
        _run(0, "platform", "shared", 300.0, 0.3),
        _run(0, PEER, "shared", 600.0, 0.1),
        _run(1, PEER, "shared", 1600.0, 0.2),
        _run(1, "direct", "shared", 2000.0, None),
        _run(1, "platform", "shared", 1000.0, 0.2),
    ]


def test_the_multiple_and_the_ratios_pair_runs_of_the_same_round(two_rounds: list[dict[str, Any]]) -> None:
    # given two rounds of direct, platform and vllm-router runs in one placement
    # when they are summarised
    entry = summarize(two_rounds, rounds=2)["chat c64"]
    # then the multiple is the median of the per-round platform / peer ratios (3x, 1x: 2x), not the ratio of the
    # medians (0.25 / 0.15 = 1.67x),
    # and each proxy's rate is divided by the direct rate of its own round
    assert entry["cpu_multiple"] == pytest.approx(2.0)
    assert entry["rate_ratio"] == pytest.approx((0.3 + 0.5) / 2)
    assert entry["peer_rate_ratio"] == pytest.approx((0.6 + 0.8) / 2)
    assert entry[PEER]["cpu_ms_per_request"] == pytest.approx(0.15)


def test_the_multiple_is_a_target_per_placement_and_the_table_shows_it(two_rounds: list[dict[str, Any]]) -> None:
    # given a summary of the shared placement whose multiple (2x) is above the 1.5x goal
    summaries = {"shared": summarize(two_rounds, rounds=2)}
    report = {
        "summary": summaries["shared"],
        "summaries": summaries,
        "runs": two_rounds,
        "memory": {"rss_peak_sampled_mib": 90.0, "vm_hwm_mib": 90.0, "rss_idle_mib": 80.0},
    }
    # when the targets and the peer table are built
    targets = {t["target"]: t for t in evaluate(report)}
    table = "\n".join(peer_tables(report))
    # then the multiple is reported as missed, and the table has the placement's row with it
    assert targets["Platform CPU per request / vllm-router's (c64, shared)"]["met"] is False
    assert "| chat c64 | shared | 1,500 | 0.40 | 0.70 | 0.250 | 0.150 | 2.00x |" in table


def test_without_the_peer_there_is_no_peer_table(two_rounds: list[dict[str, Any]]) -> None:
    # given runs without vllm-router (make bench-quick)
    runs = [r for r in two_rounds if r["target"] != PEER]
    summaries = {"pinned": summarize(runs, rounds=2)}
    # when the peer table is built
    # then there is none, and no multiple is computed
    assert peer_tables({"summaries": summaries}) == []
    assert "cpu_multiple" not in summaries["pinned"]["chat c64"]
