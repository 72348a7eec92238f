from __future__ import annotations

from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from chat import services
        from fleet import calls

        # The worker records a chat.send's outcome (the message's state, the audit result).
        calls.register_recorder("chat.send", services.record_send_outcome)
