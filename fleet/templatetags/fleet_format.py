"""Small display filters for the fleet pages (numbers that fit a phone screen)."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.filter
def tokens(value: Any) -> str:
    """12345 -> "12.3k", 2500000 -> "2.5M", None -> "–"."""
    if value is None or value == "":
        return "–"
    try:
        n = float(value)
    except (TypeError, ValueError):
        return "–"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            text = f"{n / limit:.1f}".removesuffix(".0")
            return f"{text}{suffix}"
    return str(int(n))


@register.filter
def percent(value: Any) -> str:
    if value is None:
        return ""
    try:
        return f"{float(value) * 100:.0f}%"
    except (TypeError, ValueError):
        return ""
