from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlcenter.settings")
# Django must be set up before anything imports models (the consumers do).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from chat.routing import websocket_urlpatterns as chat_ws  # noqa: E402
from controlcenter.heap import freeze_startup_objects  # noqa: E402
from controlcenter.proxy import TrustedProxyMiddleware  # noqa: E402
from fleet.routing import websocket_urlpatterns as fleet_ws  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # The Origin check is the WebSocket's CSRF protection.
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(fleet_ws + chat_ws))
        ),
    }
)
# Client address and scheme from trusted proxies only, for HTTP and WebSocket alike.
application = TrustedProxyMiddleware(application, settings.TRUSTED_PROXIES)

freeze_startup_objects()
