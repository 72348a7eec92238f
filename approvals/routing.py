from __future__ import annotations

from typing import Any

from django.urls import path

from approvals import consumers

websocket_urlpatterns: list[Any] = [
    path("ws/approvals/", consumers.ApprovalsConsumer.as_asgi()),
]
