"""bench/tracing.py's table: medians per variant and their ratios to tracing off."""

from __future__ import annotations

from typing import Any

from bench.tracing import SCENARIOS, VARIANTS, table


def _runs(cpu: list[float], rate: list[float]) -> list[dict[str, Any]]:
    return [{"cpu_ms_per_request": c, "rate": r} for c, r in zip(cpu, rate, strict=True)]


def test_table_gives_medians_and_ratios_to_off() -> None:
    per_variant = {
        "off": _runs([0.2, 0.3, 0.25], [2000.0, 1000.0, 1500.0]),  # medians 0.25 ms, 1,500/s
        "on, 100 %": _runs([0.5, 0.6, 0.4], [750.0, 800.0, 700.0]),  # 0.5 ms (2.00x), 750/s (0.50x)
        "on, 1 %": _runs([0.26, 0.24, 0.25], [1500.0, 1500.0, 1500.0]),  # 0.25 ms (1.00x), 1,500/s (1.00x)
    }
    assert list(per_variant) == list(VARIANTS)
    results = {s.name: per_variant for s in SCENARIOS}
    meta = {
        "date": "2026-12-02 07:40 UTC",
        "rounds": 3,
        "duration": 5.0,
        "other_load_cores": 1.2,
        "other_load_median": 0.9,
        "export_requests": 10,
        "export_mib": 1.5,
    }
    text = table(results, meta)
    assert "| chat c64 | off | 1,500 req/s | 0.250 ms | 1.00x | 1.00x |" in text
    assert "| chat c64 | on, 100 % | 750 req/s | 0.500 ms | 2.00x | 0.50x |" in text
    assert "| stream c16 | on, 1 % | 1,500 streams/s | 0.250 ms | 1.00x | 1.00x |" in text
    assert "other load 1.20 cores" in text
