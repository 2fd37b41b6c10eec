"""Server-side SVG charts of usage (inline markup, no JavaScript), on the frame of core.svg (as the check charts)."""

from __future__ import annotations

from collections.abc import Sequence

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from core.svg import BLUE, RED, HBars, frame, legend, nice_max, svg, x_labels, x_positions, y_at

Series = tuple[str, str, Sequence[float]]  # (name, colour, one value per label)


def _ticks(top: float, fmt: str = "{:g}") -> list[tuple[float, str]]:
    return [(top * f, _compact(top * f) if fmt == "{:g}" else fmt.format(top * f)) for f in (0, 0.5, 1)]


def _compact(value: float) -> str:
    """1234567 -> 1.2M, 1500 -> 1.5k."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:g}"


def stacked_bars_svg(labels: Sequence[str], series: Sequence[Series], title: str) -> str:
    """One bar per label, its series stacked bottom-up (e.g. successful and failed requests per hour)."""
    totals = [sum(s[2][i] for s in series) for i in range(len(labels))]
    top = nice_max(max(totals, default=0.0))
    parts = frame(title, _ticks(top), top)
    xs, slot = x_positions(len(labels))
    bar_w = max(1.5, min(28.0, slot * 0.7))
    for i, x in enumerate(xs):
        base = y_at(0, top)
        tip = f"{labels[i]}: " + ", ".join(f"{name} {values[i]:g}" for name, _, values in series)
        for _name, colour, values in series:
            if values[i] <= 0:
                continue
            height = max(y_at(0, top) - y_at(values[i], top), 1.0)  # the value's pixel height
            parts.append(
                f'<rect x="{x - bar_w / 2:.1f}" y="{base - height:.1f}" width="{bar_w:.1f}" height="{height:.1f}" '
                f'fill="{colour}"><title>{escape(tip)}</title></rect>'
            )
            base -= height
    parts += legend([(name, colour) for name, colour, _ in series])
    parts += x_labels(labels, xs)
    return svg(parts, title)


GappedSeries = tuple[str, str, Sequence[float | None]]  # a None value: nothing measured (a gap in the line)


def lines_svg(labels: Sequence[str], series: Sequence[Series] | Sequence[GappedSeries], title: str) -> str:
    """One line per series over the labels (e.g. prompt and completion tokens per hour); a None value leaves a gap
    (e.g. an hour without streams has no time to first token, which is not 0)."""
    top = nice_max(max((v for _, _, values in series for v in values if v is not None), default=0.0))
    parts = frame(title, _ticks(top), top)
    xs, _ = x_positions(len(labels))
    for name, colour, values in series:
        if not values:
            continue
        segments: list[list[str]] = [[]]
        for x, v in zip(xs, values, strict=True):
            if v is None:
                segments.append([])
            else:
                segments[-1].append(f"{x:.1f},{y_at(v, top):.1f}")
        for points in segments:
            if len(points) > 1:
                parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, label, value in zip(xs, labels, values, strict=True):
            if value is None:
                continue
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y_at(value, top):.1f}" r="2.5" fill="{colour}">'
                f"<title>{escape(f'{label}: {name} {value:g}')}</title></circle>"
            )
    parts += legend([(name, colour) for name, colour, _ in series])
    parts += x_labels(labels, xs)
    return svg(parts, title)


def hbars_svg(rows: Sequence[tuple[str, float, float]], title: str, unit: str = "") -> SafeString:
    """Horizontal bars, one per row (label, value, errors): the error share of each bar drawn in red."""
    if not rows:
        return mark_safe("")
    chart = HBars(title, rows=len(rows), top=nice_max(max(value for _, value, _ in rows)), label_w=200)
    parts = chart.frame(_compact)
    for i, (label, value, errors) in enumerate(rows):
        bar = max(chart.length(value), 1.5) if value else 0.0
        parts += chart.row(
            i,
            label=label[:32],
            bar=bar,
            colour=BLUE,
            tip=f"{label}: {value:g}{unit}" + (f", {errors:g} errors" if errors else ""),
            value_text=f"{_compact(value)}{unit}",
            tail=(chart.length(min(errors, value)) if value else 0.0, RED),
        )
    return chart.svg(parts)


__all__ = ["hbars_svg", "lines_svg", "stacked_bars_svg"]
