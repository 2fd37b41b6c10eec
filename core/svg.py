"""The frame of the admin's server-side SVG charts (inline markup, no JavaScript): size, axes, colours.

Shared by the check trend charts (backends.checks.charts) and the usage charts (governance.charts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from django.utils.html import escape

WIDTH = 640
HEIGHT = 180
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 24, 34
GREEN, ORANGE, RED, GREY, BLUE = "#1a7f37", "#b35900", "#cf222e", "#6e7781", "#0969da"
FONT = 'font-family="-apple-system,Segoe UI,Helvetica,Arial,sans-serif" font-size="11"'


def nice_max(value: float) -> float:
    """A round axis maximum at or above value (1, 2, 2.5, 5 x 10^n)."""
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent


def x_positions(count: int) -> tuple[list[float], float]:
    """Centres of `count` slots across the plot area and the slot width."""
    plot_w = WIDTH - LEFT - RIGHT
    slot = plot_w / max(count, 1)
    return [LEFT + slot * (i + 0.5) for i in range(count)], slot


def y_at(value: float, top: float) -> float:
    """Plot y of a value on a 0..top axis."""
    plot_h = HEIGHT - TOP - BOTTOM
    return TOP + plot_h * (1 - (value / top if top else 0))


def frame(title: str, ticks: Sequence[tuple[float, str]], top: float) -> list[str]:
    """Title, horizontal grid lines with labels, and the x axis."""
    parts = [f'<text x="{LEFT}" y="15" {FONT} font-weight="600" fill="#24292f">{escape(title)}</text>']
    for value, label in ticks:
        y = y_at(value, top)
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#d0d7de" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" {FONT} text-anchor="end" fill="{GREY}">{escape(label)}</text>'
        )
    return parts


def svg(parts: list[str], label: str) -> str:
    """Wrap chart parts in a standalone SVG element."""
    body = "".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(label)}" style="background:#fff;border:1px solid #d0d7de;border-radius:6px">'
        f"{body}</svg>"
    )
