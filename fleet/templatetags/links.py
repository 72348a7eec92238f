"""`{{ pk|link:"url-name" }}`: `{% url "url-name" pk %}` for rows rendered by the hundred.

Django's `reverse` walks the URLconf on every call (about 30 µs here); a session row has
three links, so a page of 50 rows spent a quarter of its render reversing. This reverses
each name once per URLconf and script prefix, with a marker where the key goes, and
formats the key into it after that. The URLs still come from the URLconf by name."""

from __future__ import annotations

from functools import lru_cache

from django import template
from django.core.exceptions import ImproperlyConfigured
from django.urls import get_script_prefix, get_urlconf, reverse

register = template.Library()

_MARK = "2147483647"  # an integer key no URL of ours has in it otherwise


@lru_cache(maxsize=128)
def _halves(name: str, prefix: str, urlconf: str | None) -> tuple[str, str]:
    path = reverse(name, args=[int(_MARK)], urlconf=urlconf)
    head, found, tail = path.partition(_MARK)
    if not found:
        raise ImproperlyConfigured(f"URL {name!r} does not take its key in the path")
    return head, tail


def link(name: str, pk: int) -> str:
    """The path of URL `name` for the integer key `pk`, as `reverse(name, args=[pk])`."""
    head, tail = _halves(name, get_script_prefix(), get_urlconf())
    return f"{head}{int(pk)}{tail}"


@register.filter(name="link")
def link_filter(pk: int, name: str) -> str:
    return link(name, pk)
