from __future__ import annotations

from typing import Any

from django.urls import path

from cron import consumers

websocket_urlpatterns: list[Any] = [
    path("ws/cron/", consumers.CronConsumer.as_asgi()),
]
