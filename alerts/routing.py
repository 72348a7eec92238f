from __future__ import annotations

from typing import Any

from django.urls import path

from alerts import consumers

websocket_urlpatterns: list[Any] = [
    path("ws/alerts/", consumers.AlertsConsumer.as_asgi()),
]
