"""The frame of the admin's server-side SVG charts (inline markup, no JavaScript): size, axes, colours, x labels,
legend, and the layout of horizontal bar charts.

Shared by the check trend charts (backends.checks.charts) and the usage charts (governance.charts), which draw
their own bars and lines on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

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


def x_labels(labels: Sequence[str], xs: Sequence[float]) -> list[str]:
    """About eight of the labels under the x axis (at the slot centres xs), always the first and the last."""
    if not labels:
        return []
    step = max(1, math.ceil(len(labels) / 8))
    shown = set(range(0, len(labels), step)) | {len(labels) - 1}
    y = HEIGHT - BOTTOM + 15
    return [
        f'<text x="{xs[i]:.1f}" y="{y}" {FONT} text-anchor="middle" fill="{GREY}">{escape(labels[i])}</text>'
        for i in sorted(shown)
    ]


def legend(entries: Sequence[tuple[str, str]], spacing: int = 95) -> list[str]:
    """A colour square and a name per (name, colour), in a row at the top right, `spacing` pixels apart."""
    parts = []
    x = WIDTH - RIGHT - spacing * len(entries)
    for offset, (name, colour) in enumerate(entries):
        lx = x + offset * spacing
        parts.append(f'<rect x="{lx}" y="7" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14}" y="16" {FONT} fill="#24292f">{escape(name)}</text>')
    return parts


def svg(parts: list[str], label: str, width: int = WIDTH, height: int = HEIGHT) -> str:
    """Wrap chart parts in a standalone SVG element."""
    body = "".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(label)}" style="background:#fff;border:1px solid #d0d7de;border-radius:6px">'
        f"{body}</svg>"
    )


@dataclass(frozen=True)
class HBars:
    """A horizontal bar chart: a row per bar with its label on the left, a 0..top scale along the x axis.

    `frame()` draws the title and the scale, `row()` one bar; `svg()` wraps them (every text is escaped).
    """

    ROW_H: ClassVar[int] = 18
    TOP_PAD: ClassVar[int] = 26

    title: str
    rows: int
    top: float
    label_w: int
    width: int = WIDTH

    @property
    def height(self) -> int:
        return self.TOP_PAD + self.ROW_H * self.rows + 22

    @property
    def plot_w(self) -> float:
        return self.width - self.label_w - 70

    def length(self, value: float) -> float:
        """The pixel length of a value on the scale."""
        return self.plot_w * value / self.top

    def frame(self, tick_label: Callable[[float], str]) -> list[str]:
        """The title and three grid lines (0, half, top) labelled with `tick_label(value)`."""
        parts = [f'<text x="8" y="15" {FONT} font-weight="600" fill="#24292f">{escape(self.title)}</text>']
        for fraction in (0, 0.5, 1):
            x = self.label_w + self.plot_w * fraction
            parts.append(
                f'<line x1="{x:.1f}" y1="{self.TOP_PAD - 4}" x2="{x:.1f}" y2="{self.height - 18}" stroke="#d0d7de"/>'
            )
            parts.append(
                f'<text x="{x:.1f}" y="{self.height - 5}" {FONT} text-anchor="middle" fill="{GREY}">'
                f"{escape(tick_label(self.top * fraction))}</text>"
            )
        return parts

    def row(
        self,
        index: int,
        *,
        label: str,
        bar: float,
        colour: str,
        tip: str,
        value_text: str,
        tail: tuple[float, str] | None = None,
    ) -> list[str]:
        """Row `index`: its label, a bar `bar` pixels long with a tooltip, optionally its last `tail[0]` pixels in
        the colour `tail[1]` (e.g. the errors' share), and `value_text` after the bar."""
        y = self.TOP_PAD + index * self.ROW_H
        parts = [
            f'<text x="{self.label_w - 8}" y="{y + 12}" {FONT} text-anchor="end" fill="#24292f">{escape(label)}</text>',
            f'<rect x="{self.label_w}" y="{y + 2}" width="{bar:.1f}" height="{self.ROW_H - 5}" fill="{colour}">'
            f"<title>{escape(tip)}</title></rect>",
        ]
        if tail is not None and tail[0] > 0:
            parts.append(
                f'<rect x="{self.label_w + bar - tail[0]:.1f}" y="{y + 2}" width="{tail[0]:.1f}" '
                f'height="{self.ROW_H - 5}" fill="{tail[1]}"><title>{escape(tip)}</title></rect>'
            )
        parts.append(
            f'<text x="{self.label_w + bar + 5:.1f}" y="{y + 12}" {FONT} fill="{GREY}">{escape(value_text)}</text>'
        )
        return parts

    def svg(self, parts: list[str]) -> SafeString:
        """The chart as a standalone SVG element."""
        return mark_safe(svg(parts, self.title, self.width, self.height))  # every interpolated text is escaped
