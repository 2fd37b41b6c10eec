"""Server-side SVG charts of check trends (pass rate and latency per run): inline markup, no JavaScript, no CSS."""

from __future__ import annotations

from collections.abc import Sequence

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from backends.checks.models import CheckResult
from backends.checks.selectors import TrendPoint
from core.svg import (
    BLUE,
    GREEN,
    GREY,
    ORANGE,
    RED,
    WIDTH,
    HBars,
    frame,
    legend,
    nice_max,
    svg,
    x_labels,
    x_positions,
    y_at,
)


def _run_labels(points: Sequence[TrendPoint]) -> list[str]:
    """The runs' numbers, the x axis labels of the trend charts."""
    return [f"#{point.run_id}" for point in points]


def _rate_colour(rate: float) -> str:
    """Green when all passed, orange from half, red below."""
    if rate >= 1.0:
        return GREEN
    return ORANGE if rate >= 0.5 else RED


def pass_rate_svg(points: Sequence[TrendPoint], title: str = "Pass rate per run") -> str:
    """Bars of the passed share of checks per run, coloured green (all), orange (half or more) or red."""
    parts = frame(title, [(0, "0%"), (50, "50%"), (100, "100%")], 100)
    xs, slot = x_positions(len(points))
    bar_w = max(2.0, min(28.0, slot * 0.7))
    base = y_at(0, 100)
    for x, point in zip(xs, points, strict=True):
        rate = point.pass_rate * 100
        height = max(base - y_at(rate, 100), 1.5)
        tip = f"{point.label}: {point.passed}/{point.total} passed ({rate:.0f}%)"
        parts.append(
            f'<rect x="{x - bar_w / 2:.1f}" y="{base - height:.1f}" width="{bar_w:.1f}" height="{height:.1f}" '
            f'fill="{_rate_colour(point.pass_rate)}"><title>{escape(tip)}</title></rect>'
        )
    parts += x_labels(_run_labels(points), xs)
    return svg(parts, title)


def latency_svg(points: Sequence[TrendPoint], title: str = "Latency per run (ms)") -> str:
    """Lines of the median and the slowest check latency per run, with the median time to first token."""
    values = [v for p in points for v in (p.latency_p50_ms, p.latency_max_ms, p.ttft_p50_ms) if v is not None]
    top = nice_max(max(values, default=1.0))
    ticks = [(top * f, f"{top * f:g}") for f in (0, 0.5, 1)]
    parts = frame(title, ticks, top)
    xs, _ = x_positions(len(points))
    series = (
        ("slowest", "latency_max_ms", GREY, ' stroke-dasharray="4 3"'),
        ("median", "latency_p50_ms", BLUE, ""),
        ("median TTFT", "ttft_p50_ms", GREEN, ' stroke-dasharray="1 3"'),
    )
    for name, attr, colour, dash in series:
        coords = [(x, getattr(p, attr), p) for x, p in zip(xs, points, strict=True) if getattr(p, attr) is not None]
        if not coords:
            continue
        path = " ".join(f"{x:.1f},{y_at(v, top):.1f}" for x, v, _ in coords)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for x, value, point in coords:
            tip = f"{point.label}: {name} {value:.0f} ms"
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y_at(value, top):.1f}" r="3" fill="{colour}">'
                f"<title>{escape(tip)}</title></circle>"
            )
    parts += legend([(name, colour) for name, _, colour, _ in series], spacing=85)
    parts += x_labels(_run_labels(points), xs)
    return svg(parts, title)


def trend_charts_html(points: Sequence[TrendPoint]) -> SafeString:
    """Both charts side by side (they wrap on narrow screens), or a note when there is no run yet."""
    if not points:
        return mark_safe('<p style="color:#6e7781">No check run has covered this yet.</p>')
    return mark_safe(  # every interpolated text is escaped above
        '<div style="display:flex;flex-wrap:wrap;gap:12px">'
        f"<div>{pass_rate_svg(points)}</div><div>{latency_svg(points)}</div></div>"
    )


def run_latency_svg(results: Sequence[CheckResult], title: str = "Latency of each check (ms)") -> SafeString:
    """Horizontal bars of one run's check latencies, green when passed, orange when slow, red when failed."""
    rows = [r for r in results if r.latency_ms is not None]
    if not rows:
        return mark_safe("")
    chart = HBars(
        title, rows=len(rows), top=nice_max(max(r.latency_ms or 0.0 for r in rows)), label_w=260, width=WIDTH + 120
    )
    parts = chart.frame(lambda value: f"{value:g}")
    for i, r in enumerate(rows):
        label = f"{r.backend_name} · {r.case_name}"
        tip = f"{label} ({r.model_name}): {r.latency_ms:.0f} ms" + (f", TTFT {r.ttft_ms:.0f} ms" if r.ttft_ms else "")
        parts += chart.row(
            i,
            label=label[:44],
            bar=max(chart.length(r.latency_ms or 0.0), 1.5),
            colour=GREEN if r.passed else (ORANGE if r.cause == "slow" else RED),
            tip=tip,
            value_text=f"{r.latency_ms:.0f}",
        )
    return chart.svg(parts)
