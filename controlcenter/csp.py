"""The Content-Security-Policy header on every response.

Ours, not django-csp: Django 5.2 has none built in, and one fixed policy for the whole site
is a few lines, where django-csp would be a dependency with a settings vocabulary of its
own (its nonces, the reason to take it, are not needed: no page has inline script or style;
a `<style>` or `style="…"` in a page is a bug this policy makes visible). The browser tests
(tests/test_browser_csp.py) visit every kind of page and fail on any violation.

- scripts, styles, images and fonts only from our own origin (static files);
- connections to our own origin: htmx requests and the WebSocket (CSP3 `'self'` covers
  ws:/wss: of the same host);
- no plugins, no <base>, forms post only to us, no framing (as X-Frame-Options: DENY).

The Django admin's own pages follow it too: their scripts are files, and their one inline
`<style>` (change_list.html) appears only when a ModelAdmin turns both action bars off,
which none of ours does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
HEADER = "Content-Security-Policy"


class ContentSecurityPolicyMiddleware:
    """Sets POLICY unless the view set a policy of its own. Sync and async, so async views
    (chat send and abort) do not pay a thread hop for it."""

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        response = self.get_response(request)
        return self._add(response)  # type: ignore[arg-type]

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)  # type: ignore[misc]
        return self._add(response)

    @staticmethod
    def _add(response: HttpResponseBase) -> HttpResponseBase:
        if HEADER not in response:
            response[HEADER] = POLICY
        return response
