from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlcenter.settings")
# Django must be set up before anything imports models (the consumers do).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import WebsocketDenier  # noqa: E402
from django.conf import settings  # noqa: E402
from django.http.request import split_domain_port, validate_host  # noqa: E402
from django.utils.http import is_same_domain  # noqa: E402

from alerts.routing import websocket_urlpatterns as alerts_ws  # noqa: E402
from approvals.routing import websocket_urlpatterns as approvals_ws  # noqa: E402
from chat.routing import websocket_urlpatterns as chat_ws  # noqa: E402
from controlcenter.heap import freeze_startup_objects  # noqa: E402
from controlcenter.proxy import TrustedProxyMiddleware  # noqa: E402
from cron.routing import websocket_urlpatterns as cron_ws  # noqa: E402
from fleet.routing import websocket_urlpatterns as fleet_ws  # noqa: E402

DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_tuple(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, the port spelled out; None if it is none."""
    try:
        parts = urlsplit(url.lower())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or port is None:
        return None
    return parts.scheme, parts.hostname, port


def origin_allowed(scope: dict[str, Any]) -> bool:
    """The WebSocket's CSRF check, by the rule Django's CSRF check applies to a POST's Origin:
    the page's own origin (scheme, host and port: the request's scheme, ws = http, and its
    Host, which must be allowed) or one of CSRF_TRUSTED_ORIGINS ("https://*.example.com"
    too). Channels' AllowedHostsOriginValidator compared the host only, so a page on
    http://host:other-port, or on plain http next to an https site, could open a socket
    with the user's cookie. Behind HTTPS (daphne's socket scope carries no scheme, and
    X-Forwarded-Proto is not trusted here) the site's origin goes into CSRF_TRUSTED_ORIGINS,
    which its POSTs need anyway."""
    headers = dict(scope.get("headers", []))
    origin = _origin_tuple(headers.get(b"origin", b"").decode("latin1"))
    if origin is None:
        return False
    host = headers.get(b"host", b"").decode("latin1")
    domain, _ = split_domain_port(host)
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:
        allowed_hosts = [".localhost", "127.0.0.1", "[::1]"]  # as Django's get_host
    if domain and validate_host(domain, allowed_hosts):
        scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
        if origin == _origin_tuple(f"{scheme}://{host}"):
            return True
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        if "*" in trusted:
            scheme, _, pattern = trusted.lower().partition("://")
            netloc = origin[1]
            if origin[2] != DEFAULT_PORTS[origin[0]]:
                netloc += f":{origin[2]}"
            if origin[0] == scheme and is_same_domain(
                netloc, pattern.replace("*", "", 1)
            ):
                return True
        elif origin == _origin_tuple(trusted):
            return True
    return False


class SameOriginValidator:
    """Refuses (403) a WebSocket whose Origin `origin_allowed` does not accept."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        if origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # The Origin check is the WebSocket's CSRF protection.
        "websocket": SameOriginValidator(
            AuthMiddlewareStack(
                URLRouter(fleet_ws + chat_ws + alerts_ws + approvals_ws + cron_ws)
            )
        ),
    }
)
# Client address and scheme from trusted proxies only, for HTTP and WebSocket alike.
application = TrustedProxyMiddleware(application, settings.TRUSTED_PROXIES)

freeze_startup_objects()
