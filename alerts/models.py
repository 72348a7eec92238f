"""Alert rules, the alerts they raise, the notices that tell people, and the outbox of
deliveries (one row per notice and destination) that the worker sends from."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from alerts.secrets import (
    mask_url,
    validate_secret_env_name,
    validate_webhook_url,
)
from fleet.models import Agent, Gateway


class AlertRule(models.Model):
    """One condition an admin switched on, with its threshold, scope and destinations.
    The webhook's signing secret is not here: `webhook_secret_env` names the worker's
    environment variable that holds it."""

    class Kind(models.TextChoices):
        GATEWAY_OFFLINE = "gateway_offline", "Gateway not connected"
        GATEWAY_ATTENTION = (
            "gateway_attention",
            "Gateway needs a person (auth failed, pairing required, TLS failed)",
        )
        RUN_FAILED = "run_failed", "Agent run ended in error"
        CRON_FAILED = "cron_failed", "Cron run failed"
        BUDGET = "budget", "Budget threshold crossed"
        APPROVAL_WAITING = "approval_waiting", "Approval waiting too long"

    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=40, choices=Kind)
    enabled = models.BooleanField(default=True)
    for_seconds = models.PositiveIntegerField(
        "for longer than (seconds)",
        default=300,
        help_text="How long the condition must hold before an alert is raised (a gateway "
        "not connected, an approval waiting). 0: at once.",
    )
    threshold = models.FloatField(
        null=True,
        blank=True,
        help_text="For budget rules: the share of the budget (percent) that raises it.",
    )
    gateway = models.ForeignKey(
        Gateway,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        help_text="Only this gateway. Blank: every gateway.",
    )
    agent = models.ForeignKey(
        Agent,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        help_text="Only this agent (for run, cron, budget and approval rules). Blank: every agent.",
    )
    cooldown_seconds = models.PositiveIntegerField(
        default=300,
        help_text="At most one notice per this many seconds: alerts that fire meanwhile "
        "wait and go out together as one digest. Recoveries are sent at once.",
    )
    email_to = models.TextField(
        "email recipients",
        blank=True,
        default="",
        help_text="Addresses, one per line or comma-separated. Sent through the "
        "Control Center's email settings (EMAIL_URL or EMAIL_*).",
    )
    webhook_url = models.CharField(
        max_length=1000,
        blank=True,
        default="",
        validators=[validate_webhook_url],
        help_text="http(s) URL that gets a JSON POST with a Slack-compatible `text`. "
        "Treated as a secret (Slack's carry a token): shown as scheme and host elsewhere.",
    )
    webhook_secret_env = models.CharField(
        "webhook secret environment variable",
        max_length=100,
        blank=True,
        default="",
        validators=[validate_secret_env_name],
        help_text="Name of the worker's environment variable (ending in _WEBHOOK_SECRET) "
        "whose value signs each POST (X-ControlCenter-Signature). Blank: unsigned.",
    )
    # Set while one worker evaluates this rule (claimed with a conditional UPDATE), so two
    # workers never raise or notify the same thing twice.
    evaluating_until = models.DateTimeField(null=True, blank=True, editable=False)
    # When this rule last sent a raise notice: the cooldown counts from here.
    last_notice_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def recipients(self) -> list[str]:
        parts = self.email_to.replace(",", "\n").replace(";", "\n").split()
        return [p.strip() for p in parts if p.strip()]

    @property
    def webhook_display(self) -> str:
        return mask_url(self.webhook_url)

    def clean(self) -> None:
        from django.core.exceptions import ValidationError
        from django.core.validators import validate_email

        if (
            self.agent_id is not None
            and self.gateway_id is not None
            and self.agent is not None
            and self.agent.gateway_id != self.gateway_id
        ):
            raise ValidationError({"agent": "This agent is on another gateway."})
        for address in self.recipients:
            try:
                validate_email(address)
            except ValidationError:
                raise ValidationError(
                    {"email_to": f"Not an email address: {address[:100]}"}
                ) from None


class Notice(models.Model):
    """What one message says: one alert raised, one recovered, or a digest of several.
    Each destination of the rule gets one Delivery of it."""

    class Kind(models.TextChoices):
        RAISED = "raised", "Raised"
        RECOVERED = "recovered", "Recovered"
        DIGEST = "digest", "Digest"

    rule = models.ForeignKey(
        AlertRule, null=True, on_delete=models.SET_NULL, related_name="notices"
    )
    kind = models.CharField(max_length=20, choices=Kind)
    subject = models.CharField(max_length=300)
    text = models.TextField()
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.subject


class Alert(models.Model):
    """One condition of one rule, from when it was raised until it clears (or a person
    resolves it). A lasting condition (a gateway down) has one open alert at a time; an
    event (a failed run) has one alert ever."""

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        ACKNOWLEDGED = "acknowledged", "Acknowledged"
        RESOLVED = "resolved", "Resolved"

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="alerts")
    key = models.CharField(
        max_length=300, help_text="Which condition: e.g. gateway:3:offline."
    )
    kind = models.CharField(max_length=40, choices=AlertRule.Kind)
    status = models.CharField(max_length=20, choices=Status, default=Status.OPEN)
    title = models.CharField(max_length=300)
    detail = models.TextField(blank=True, default="")
    gateway = models.ForeignKey(
        Gateway, null=True, blank=True, on_delete=models.SET_NULL
    )
    agent = models.ForeignKey(Agent, null=True, blank=True, on_delete=models.SET_NULL)
    lasting = models.BooleanField(
        default=True, help_text="Clears by itself (and a recovery is sent)."
    )
    since = models.DateTimeField(help_text="When the condition began.")
    raised_at = models.DateTimeField(default=timezone.now)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Blank on a resolved alert: the condition cleared by itself.",
    )
    raise_notice = models.ForeignKey(
        Notice, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    recovery_notice = models.ForeignKey(
        Notice, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-raised_at", "-id"]
        constraints = [
            # One alert per condition until it clears (also between two workers).
            models.UniqueConstraint(
                fields=["rule", "key"],
                condition=Q(resolved_at=None),
                name="alert_one_open_per_condition",
            )
        ]
        indexes = [
            # The list and the navigation count: alerts not resolved yet.
            models.Index(
                fields=["-raised_at"],
                name="alert_unresolved",
                condition=Q(resolved_at=None),
            ),
            # The evaluator: a rule's alerts by condition.
            models.Index(fields=["rule", "key"], name="alert_rule_key"),
        ]

    def __str__(self) -> str:
        return self.title

    @property
    def is_open(self) -> bool:
        return self.status == self.Status.OPEN

    @property
    def badge_class(self) -> str:
        """The CSS class of its status badge (app.css `.badge.ok/.warn/.bad`)."""
        return ALERT_STATUS_BADGES.get(self.status, "ok")

    @property
    def is_resolved(self) -> bool:
        return self.status == self.Status.RESOLVED


ALERT_STATUS_BADGES: dict[str, str] = {
    Alert.Status.OPEN: "bad",
    Alert.Status.ACKNOWLEDGED: "warn",
    Alert.Status.RESOLVED: "ok",
}


class Delivery(models.Model):
    """The outbox: one notice to one destination (a webhook, or one email address).
    Claimed with a conditional UPDATE, sent, then marked; retried with backoff."""

    class Channel(models.TextChoices):
        EMAIL = "email", "Email"
        WEBHOOK = "webhook", "Webhook"

    class Status(models.TextChoices):
        PENDING = "pending", "Waiting"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Gave up"

    notice = models.ForeignKey(
        Notice, on_delete=models.CASCADE, related_name="deliveries"
    )
    channel = models.CharField(max_length=10, choices=Channel)
    address = models.CharField(
        max_length=300,
        blank=True,
        default="",
        help_text="The email address; blank for the rule's webhook.",
    )
    # Sent as the webhook's X-ControlCenter-Delivery header and in the email's Message-ID,
    # so a receiver can drop a repeat (the worker died after sending, before marking).
    idempotency_key = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    status = models.CharField(max_length=10, choices=Status, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    claimed_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    sent_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name_plural = "deliveries"
        indexes = [
            # deliver_due(): what is waiting or stuck in a dead worker's claim.
            models.Index(
                fields=["next_attempt_at"],
                name="delivery_due",
                condition=Q(status__in=["pending", "sending"]),
            )
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.address or ''}".strip()
