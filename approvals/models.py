"""Exec approvals, kept by the Control Center for as long as the team wants (the gateway's
own ledger keeps 30 days and names the connection, not the person)."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from fleet.models import Gateway


class Approval(models.Model):
    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        ALLOWED = "allowed", "Allowed"
        DENIED = "denied", "Denied"
        EXPIRED = "expired", "Expired"

    gateway = models.ForeignKey(
        Gateway, on_delete=models.CASCADE, related_name="approvals"
    )
    approval_id = models.CharField(max_length=200)
    kind = models.CharField(max_length=20, default="exec")
    command = models.TextField(blank=True)
    command_argv = models.JSONField(default=list, blank=True)
    risk_kinds = models.JSONField(default=list, blank=True)
    warning_lines = models.JSONField(default=list, blank=True)
    host = models.CharField(max_length=200, blank=True)
    cwd = models.TextField(blank=True)
    resolved_path = models.TextField(blank=True)
    agent_id = models.CharField(max_length=200, blank=True, db_index=True)
    session_key = models.CharField(max_length=500, blank=True, db_index=True)
    run_id = models.CharField(max_length=200, blank=True)
    tool_call_id = models.CharField(max_length=200, blank=True)
    source_channel = models.CharField(max_length=100, blank=True)
    allowed_decisions = models.JSONField(default=list, blank=True)
    requested_at = models.DateTimeField(default=timezone.now, db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    state = models.CharField(
        max_length=10, choices=State.choices, default=State.PENDING, db_index=True
    )
    decision = models.CharField(max_length=20, blank=True)
    # The person who decided here (set when they claim the decision, kept after); None when
    # it was decided elsewhere (the gateway's UI, a channel) or expired.
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    decided_by_name = models.CharField(max_length=150, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(
        max_length=200, blank=True
    )  # the gateway's resolvedBy
    note = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ("-requested_at",)
        constraints = [
            models.UniqueConstraint(
                fields=("gateway", "approval_id"), name="approval_unique_per_gateway"
            )
        ]
        permissions = [("decide", "Can decide exec approvals")]

    def __str__(self) -> str:
        return f"{self.command[:60]} ({self.get_state_display()})"

    @property
    def pending(self) -> bool:
        return self.state == self.State.PENDING

    @property
    def decider(self) -> str:
        """Who decided, in words: the person here, else the gateway's resolvedBy."""
        return self.decided_by_name or self.resolved_by
