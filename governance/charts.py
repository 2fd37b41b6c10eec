"""Server-side SVG charts of usage (inline markup, no JavaScript), on the frame of core.svg (as the check charts)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from core.svg import BLUE, GREEN, GREY, HEIGHT, RED, WIDTH
from core.svg import BOTTOM as _BOTTOM
from core.svg import FONT as _FONT
from core.svg import RIGHT as _RIGHT
from core.svg import frame as _frame
from core.svg import nice_max as _nice_max
from core.svg import svg as _svg
from core.svg import x_positions as _x_positions
from core.svg import y_at as _y

Series = tuple[str, str, Sequence[float]]  # (name, colour, one value per label)


def _ticks(top: float, fmt: str = "{:g}") -> list[tuple[float, str]]:
    return [(top * f, _compact(top * f) if fmt == "{:g}" else fmt.format(top * f)) for f in (0, 0.5, 1)]


def _compact(value: float) -> str:
    """1234567 -> 1.2M, 1500 -> 1.5k."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:g}"


def _x_labels(labels: Sequence[str], xs: Sequence[float]) -> list[str]:
    """About eight labels under the x axis, always the first and the last."""
    if not labels:
        return []
    step = max(1, math.ceil(len(labels) / 8))
    shown = set(range(0, len(labels), step)) | {len(labels) - 1}
    y = HEIGHT - _BOTTOM + 15
    return [
        f'<text x="{xs[i]:.1f}" y="{y}" {_FONT} text-anchor="middle" fill="{GREY}">{escape(labels[i])}</text>'
        for i in sorted(shown)
    ]


def _legend(series: Sequence[tuple[str, str]]) -> list[str]:
    parts = []
    x = WIDTH - _RIGHT - 95 * len(series)
    for offset, (name, colour) in enumerate(series):
        lx = x + offset * 95
        parts.append(f'<rect x="{lx}" y="7" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14}" y="16" {_FONT} fill="#24292f">{escape(name)}</text>')
    return parts


def stacked_bars_svg(labels: Sequence[str], series: Sequence[Series], title: str) -> str:
    """One bar per label, its series stacked bottom-up (e.g. successful and failed requests per hour)."""
    totals = [sum(s[2][i] for s in series) for i in range(len(labels))]
    top = _nice_max(max(totals, default=0.0))
    parts = _frame(title, _ticks(top), top)
    xs, slot = _x_positions(len(labels))
    bar_w = max(1.5, min(28.0, slot * 0.7))
    for i, x in enumerate(xs):
        base = _y(0, top)
        tip = f"{labels[i]}: " + ", ".join(f"{name} {values[i]:g}" for name, _, values in series)
        for _name, colour, values in series:
            if values[i] <= 0:
                continue
            height = max(_y(0, top) - _y(values[i], top), 1.0)  # the value's pixel height
            parts.append(
                f'<rect x="{x - bar_w / 2:.1f}" y="{base - height:.1f}" width="{bar_w:.1f}" height="{height:.1f}" '
                f'fill="{colour}"><title>{escape(tip)}</title></rect>'
            )
            base -= height
    parts += _legend([(name, colour) for name, colour, _ in series])
    parts += _x_labels(labels, xs)
    return _svg(parts, title)


GappedSeries = tuple[str, str, Sequence[float | None]]  # a None value: nothing measured (a gap in the line)


def lines_svg(labels: Sequence[str], series: Sequence[Series] | Sequence[GappedSeries], title: str) -> str:
    """One line per series over the labels (e.g. prompt and completion tokens per hour); a None value leaves a gap
    (e.g. an hour without streams has no time to first token, which is not 0)."""
    top = _nice_max(max((v for _, _, values in series for v in values if v is not None), default=0.0))
    parts = _frame(title, _ticks(top), top)
    xs, _ = _x_positions(len(labels))
    for name, colour, values in series:
        if not values:
            continue
        segments: list[list[str]] = [[]]
        for x, v in zip(xs, values, strict=True):
            if v is None:
                segments.append([])
            else:
                segments[-1].append(f"{x:.1f},{_y(v, top):.1f}")
        for points in segments:
            if len(points) > 1:
                parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, label, value in zip(xs, labels, values, strict=True):
            if value is None:
                continue
            parts.append(
                f'<circle cx="{x:.1f}" cy="{_y(value, top):.1f}" r="2.5" fill="{colour}">'
                f"<title>{escape(f'{label}: {name} {value:g}')}</title></circle>"
            )
    parts += _legend([(name, colour) for name, colour, _ in series])
    parts += _x_labels(labels, xs)
    return _svg(parts, title)


def hbars_svg(rows: Sequence[tuple[str, float, float]], title: str, unit: str = "") -> SafeString:
    """Horizontal bars, one per row (label, value, errors): the error share of each bar drawn in red."""
    if not rows:
        return mark_safe("")
    label_w, row_h, top_pad = 200, 18, 26
    width, height = WIDTH, top_pad + row_h * len(rows) + 22
    top = _nice_max(max(value for _, value, _ in rows))
    plot_w = width - label_w - 70
    parts = [f'<text x="8" y="15" {_FONT} font-weight="600" fill="#24292f">{escape(title)}</text>']
    for fraction in (0, 0.5, 1):
        x = label_w + plot_w * fraction
        parts.append(f'<line x1="{x:.1f}" y1="{top_pad - 4}" x2="{x:.1f}" y2="{height - 18}" stroke="#d0d7de"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{height - 5}" {_FONT} text-anchor="middle" fill="{GREY}">'
            f"{_compact(top * fraction)}</text>"
        )
    for i, (label, value, errors) in enumerate(rows):
        y = top_pad + i * row_h
        bar = max(plot_w * value / top, 1.5) if value else 0.0
        bad = plot_w * min(errors, value) / top if value else 0.0
        tip = f"{label}: {value:g}{unit}" + (f", {errors:g} errors" if errors else "")
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 12}" {_FONT} text-anchor="end" fill="#24292f">{escape(label[:32])}</text>'
        )
        parts.append(
            f'<rect x="{label_w}" y="{y + 2}" width="{bar:.1f}" height="{row_h - 5}" fill="{BLUE}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        if bad > 0:
            parts.append(
                f'<rect x="{label_w + bar - bad:.1f}" y="{y + 2}" width="{bad:.1f}" height="{row_h - 5}" '
                f'fill="{RED}"><title>{escape(tip)}</title></rect>'
            )
        parts.append(
            f'<text x="{label_w + bar + 5:.1f}" y="{y + 12}" {_FONT} fill="{GREY}">{_compact(value)}{unit}</text>'
        )
    body = "".join(parts)
    return mark_safe(  # every interpolated text is escaped above
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(title)}" style="background:#fff;border:1px solid #d0d7de;border-radius:6px">'
        f"{body}</svg>"
    )


__all__ = ["GREEN", "RED", "hbars_svg", "lines_svg", "stacked_bars_svg"]
