from __future__ import annotations

import hashlib
import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from fleet.models import Session


def run_dom_id(run_id: str) -> str:
    """The page element of a run's reply. Run ids come from the gateway (any characters),
    so the id is a digest: always a valid, short HTML id and CSS selector."""
    return "run-" + hashlib.blake2s(run_id.encode(), digest_size=8).hexdigest()


class Message(models.Model):
    """One transcript entry. A message sent from here has our own id, which is also the
    `idempotencyKey` (and so the gateway's `runId`); a message learnt from the gateway is
    identified by the gateway's message id, or by its seq in the transcript."""

    class Role(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"
        SYSTEM = "system", "System"
        TOOL = "tool", "Tool"

    class State(models.TextChoices):
        PENDING = "pending", "Waiting for the gateway"
        SENT = "sent", "Sent"
        FINAL = "final", "Final"
        ERROR = "error", "Error"
        ABORTED = "aborted", "Aborted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(
        Session, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=20, choices=Role)
    text = models.TextField(blank=True, default="")
    state = models.CharField(max_length=10, choices=State, default=State.FINAL)
    error = models.TextField(blank=True, default="")
    sender = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    run_id = models.CharField(max_length=200, blank=True, default="")
    gateway_message_id = models.CharField(max_length=200, blank=True, default="")
    gateway_seq = models.IntegerField(null=True, blank=True)
    model = models.CharField(max_length=200, blank=True, default="")
    usage = models.JSONField(default=dict, blank=True)
    duration_ms = models.IntegerField(null=True, blank=True)
    raw = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["session", "gateway_message_id"],
                condition=~Q(gateway_message_id=""),
                name="message_unique_gateway_id",
            ),
        ]
        indexes = [
            # The transcript, newest first for paging back.
            models.Index(
                fields=["session", "-created_at"], name="message_session_recent"
            ),
            models.Index(fields=["session", "run_id"], name="message_session_run"),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.text[:40]}"

    @property
    def dom_id(self) -> str:
        if self.role == self.Role.ASSISTANT and self.run_id:
            return run_dom_id(self.run_id)
        return f"msg-{self.pk}"

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        tools = self.raw.get("tools") if isinstance(self.raw, dict) else None
        return (
            [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
        )

    @property
    def total_tokens(self) -> int | None:
        usage = self.usage if isinstance(self.usage, dict) else {}
        for key in ("total", "totalTokens"):
            if isinstance(usage.get(key), int):
                return int(usage[key])
        parts = [
            usage.get(k) for k in ("input", "output", "inputTokens", "outputTokens")
        ]
        numbers = [p for p in parts if isinstance(p, int)]
        return sum(numbers) if numbers else None
