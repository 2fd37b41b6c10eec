"""Number formats of the operations dashboard (DASH for a figure that is not known)."""

from __future__ import annotations

from django import template

register = template.Library()
DASH = "–"


@register.filter
def percent(value: float | None) -> str:
    """0.123 -> "12.3 %" (one decimal under 10 %)."""
    if value is None:
        return DASH
    share = value * 100
    return f"{share:.1f} %" if share < 10 else f"{share:.0f} %"


@register.filter
def percent_number(value: float | None) -> str:
    """0.123 -> "12.3" (for a CSS width)."""
    return "0" if value is None else f"{min(max(value, 0.0), 1.0) * 100:.1f}"


@register.filter
def rate(value: float | None) -> str:
    """Requests per second: two decimals below 10, none above."""
    if value is None:
        return DASH
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


@register.filter
def ms(value: float | None) -> str:
    """Milliseconds, or seconds past 10 s."""
    if value is None:
        return DASH
    return f"{value:.0f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


@register.filter
def dashed(value: str) -> str:
    """half_open -> half-open."""
    return str(value).replace("_", "-")
