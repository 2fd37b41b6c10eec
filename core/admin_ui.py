"""Small HTML pieces of the admin pages shared by the apps."""

from __future__ import annotations

from django.utils.html import format_html
from django.utils.safestring import SafeString


def badge(text: str, colour: str) -> SafeString:
    """A coloured pill with white text (status, state, circuit)."""
    return format_html(
        '<span style="background:{};color:#fff;padding:1px 8px;border-radius:9px;font-size:11px">{}</span>',
        colour,
        text,
    )
