from __future__ import annotations

from typing import Any

from django.urls import path

from fleet import consumers
from fleet.nav import NavConsumer

websocket_urlpatterns: list[Any] = [
    path("ws/fleet/", consumers.FleetConsumer.as_asgi()),
    path("ws/sessions/<int:pk>/", consumers.SessionConsumer.as_asgi()),
    path("ws/nav/", NavConsumer.as_asgi()),
]
