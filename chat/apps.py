from __future__ import annotations

from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from chat import relay, sending
        from fleet import calls, capabilities

        # The worker routes chat's gateway events here (and tells it of a lost connection).
        capabilities.register(relay.capability())

        # The worker records a chat.send's outcome (the message's state, the audit result).
        calls.register_recorder("chat.send", sending.record_send_outcome)
