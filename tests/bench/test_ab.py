"""bench/ab.py's pure part: medians per target and the CPU multiple against the peer, paired by round."""

from __future__ import annotations

from typing import Any

import pytest

from bench.ab import PEER, line, summary


def _run(rnd: int, target: str, cpu_ms: float, syscalls: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "round": rnd,
        "target": target,
        "answered": 1000,
        "errors": 0,
        "rate": 1000.0,
        "cpu_ms": cpu_ms,
        "main_ms": cpu_ms * 0.8,
        "other_ms": cpu_ms * 0.2,
        "foreign_cores": 0.1,
        "syscalls_per_request": syscalls or {},
    }


def test_the_multiple_is_the_median_of_the_per_round_ratios() -> None:
    # given three rounds of two variants and the peer
    runs = [
        _run(0, "a", 0.3, {"getpid": 6.0}),
        _run(0, "b", 0.2),
        _run(0, PEER, 0.1),
        _run(1, "a", 0.6, {"getpid": 6.0}),
        _run(1, "b", 0.3),
        _run(1, PEER, 0.3),
        _run(2, "a", 0.4, {"getpid": 5.0}),
        _run(2, "b", 0.2),
        _run(2, PEER, 0.1),
    ]
    # when they are summarised
    rows = {row["target"]: row for row in summary(runs, ["a", "b", PEER])}
    # then each figure is the median over the rounds, the multiple the median of 3x, 2x, 4x
    assert rows["a"]["cpu_ms"] == pytest.approx(0.4) and rows["a"]["cpu_multiple"] == pytest.approx(3.0)
    assert rows["b"]["cpu_multiple"] == pytest.approx(2.0) and rows[PEER]["cpu_multiple"] is None
    assert rows["a"]["syscalls_per_request"] == {"getpid": 6.0} and rows["b"]["syscalls_per_request"] == {}
    assert "3.00x vllm-router" in line(rows["a"]) and "getpid 6.00" in line(rows["a"])
