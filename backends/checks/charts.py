"""Server-side SVG charts of check trends (pass rate and latency per run): inline markup, no JavaScript, no CSS."""

from __future__ import annotations

import math
from collections.abc import Sequence

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from backends.checks.models import CheckResult
from backends.checks.selectors import TrendPoint
from core.svg import BLUE, GREEN, GREY, HEIGHT, ORANGE, RED, WIDTH
from core.svg import BOTTOM as _BOTTOM
from core.svg import FONT as _FONT
from core.svg import RIGHT as _RIGHT
from core.svg import frame as _frame
from core.svg import nice_max as _nice_max
from core.svg import svg as _svg
from core.svg import x_positions as _x_positions
from core.svg import y_at as _y


def _x_labels(points: Sequence[TrendPoint], xs: Sequence[float]) -> list[str]:
    """Run numbers under the x axis (about eight of them, always the first and last)."""
    step = max(1, math.ceil(len(points) / 8))
    shown = set(range(0, len(points), step)) | {len(points) - 1}
    y = HEIGHT - _BOTTOM + 15
    return [
        f'<text x="{xs[i]:.1f}" y="{y}" {_FONT} text-anchor="middle" fill="{GREY}">#{points[i].run_id}</text>'
        for i in sorted(shown)
    ]


def _rate_colour(rate: float) -> str:
    """Green when all passed, orange from half, red below."""
    if rate >= 1.0:
        return GREEN
    return ORANGE if rate >= 0.5 else RED


def pass_rate_svg(points: Sequence[TrendPoint], title: str = "Pass rate per run") -> str:
    """Bars of the passed share of checks per run, coloured green (all), orange (half or more) or red."""
    parts = _frame(title, [(0, "0%"), (50, "50%"), (100, "100%")], 100)
    xs, slot = _x_positions(len(points))
    bar_w = max(2.0, min(28.0, slot * 0.7))
    base = _y(0, 100)
    for x, point in zip(xs, points, strict=True):
        rate = point.pass_rate * 100
        y = _y(rate, 100)
        height = max(base - y, 1.5)
        tip = f"{point.label}: {point.passed}/{point.total} passed ({rate:.0f}%)"
        parts.append(
            f'<rect x="{x - bar_w / 2:.1f}" y="{base - height:.1f}" width="{bar_w:.1f}" height="{height:.1f}" '
            f'fill="{_rate_colour(point.pass_rate)}"><title>{escape(tip)}</title></rect>'
        )
    parts += _x_labels(points, xs)
    return _svg(parts, title)


def latency_svg(points: Sequence[TrendPoint], title: str = "Latency per run (ms)") -> str:
    """Lines of the median and the slowest check latency per run, with the median time to first token."""
    values = [v for p in points for v in (p.latency_p50_ms, p.latency_max_ms, p.ttft_p50_ms) if v is not None]
    top = _nice_max(max(values, default=1.0))
    ticks = [(top * f, f"{top * f:g}") for f in (0, 0.5, 1)]
    parts = _frame(title, ticks, top)
    xs, _ = _x_positions(len(points))
    series = (
        ("slowest", "latency_max_ms", GREY, ' stroke-dasharray="4 3"'),
        ("median", "latency_p50_ms", BLUE, ""),
        ("median TTFT", "ttft_p50_ms", GREEN, ' stroke-dasharray="1 3"'),
    )
    for name, attr, colour, dash in series:
        coords = [(x, getattr(p, attr), p) for x, p in zip(xs, points, strict=True) if getattr(p, attr) is not None]
        if not coords:
            continue
        path = " ".join(f"{x:.1f},{_y(v, top):.1f}" for x, v, _ in coords)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for x, value, point in coords:
            tip = f"{point.label}: {name} {value:.0f} ms"
            parts.append(
                f'<circle cx="{x:.1f}" cy="{_y(value, top):.1f}" r="3" fill="{colour}">'
                f"<title>{escape(tip)}</title></circle>"
            )
    legend_x = WIDTH - _RIGHT - 250
    for offset, (name, _, colour, _) in enumerate(series):
        lx = legend_x + offset * 85
        parts.append(f'<rect x="{lx}" y="7" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14}" y="16" {_FONT} fill="#24292f">{escape(name)}</text>')
    parts += _x_labels(points, xs)
    return _svg(parts, title)


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
    label_w, row_h, top_pad = 260, 18, 26
    width, height = WIDTH + 120, top_pad + row_h * len(rows) + 22
    top = _nice_max(max(r.latency_ms or 0.0 for r in rows))
    plot_w = width - label_w - 70
    parts = [f'<text x="8" y="15" {_FONT} font-weight="600" fill="#24292f">{escape(title)}</text>']
    for fraction in (0, 0.5, 1):
        x = label_w + plot_w * fraction
        parts.append(f'<line x1="{x:.1f}" y1="{top_pad - 4}" x2="{x:.1f}" y2="{height - 18}" stroke="#d0d7de"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{height - 5}" {_FONT} text-anchor="middle" fill="{GREY}">{top * fraction:g}</text>'
        )
    for i, r in enumerate(rows):
        y = top_pad + i * row_h
        colour = GREEN if r.passed else (ORANGE if r.cause == "slow" else RED)
        bar = max(plot_w * (r.latency_ms or 0.0) / top, 1.5)
        label = f"{r.backend_name} · {r.case_name}"
        tip = f"{label} ({r.model_name}): {r.latency_ms:.0f} ms" + (f", TTFT {r.ttft_ms:.0f} ms" if r.ttft_ms else "")
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 12}" {_FONT} text-anchor="end" fill="#24292f">{escape(label[:44])}</text>'
        )
        parts.append(
            f'<rect x="{label_w}" y="{y + 2}" width="{bar:.1f}" height="{row_h - 5}" fill="{colour}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        parts.append(f'<text x="{label_w + bar + 5:.1f}" y="{y + 12}" {_FONT} fill="{GREY}">{r.latency_ms:.0f}</text>')
    body = "".join(parts)
    return mark_safe(  # every interpolated text is escaped above
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(title)}" style="background:#fff;border:1px solid #d0d7de;border-radius:6px">'
        f"{body}</svg>"
    )
