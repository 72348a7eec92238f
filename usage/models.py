"""The usage ledger: what each run (or each observed growth of a session's counters) cost,
kept by the Control Center itself so that a reset or deleted session, on the gateway or in
our admin, keeps its spend. Rows are only ever added."""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from fleet.models import Gateway, Session


class UsageEntry(models.Model):
    """One increase of usage: a run (run_id set) or a growth of a session's counters seen
    without its run. Names are copied (agent, model, channel): the ledger outlives the
    fleet rows it came from (a deleted session sets `session` to NULL, the row stays)."""

    gateway = models.ForeignKey(Gateway, on_delete=models.PROTECT, related_name="+")
    session = models.ForeignKey(
        Session, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    session_key = models.CharField(max_length=512)
    gateway_session_id = models.CharField(max_length=200, blank=True, default="")
    agent_key = models.CharField(max_length=200, blank=True, default="")
    model = models.CharField(max_length=200, blank=True, default="")
    provider = models.CharField(max_length=100, blank=True, default="")
    channel = models.CharField(max_length=100, blank=True, default="")
    run_id = models.CharField(max_length=200, blank=True, default="")
    person = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cache_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal(0))
    occurred_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            # Idempotent by run: a run is booked once, whatever replays it.
            models.UniqueConstraint(
                fields=["gateway", "run_id"],
                condition=~Q(run_id=""),
                name="usage_entry_run_once",
            )
        ]
        indexes = [
            # The session page's runs and cost over time.
            models.Index(
                fields=["gateway", "session_key", "occurred_at"],
                name="usage_entry_session",
            ),
        ]


class UsageDay(models.Model):
    """The daily rollup the usage page reads: one row per day and gateway, agent, model,
    provider, channel and person, updated in the same transaction as the ledger row."""

    day = models.DateField()
    gateway = models.ForeignKey(Gateway, on_delete=models.PROTECT, related_name="+")
    agent_key = models.CharField(max_length=200, blank=True, default="")
    model = models.CharField(max_length=200, blank=True, default="")
    provider = models.CharField(max_length=100, blank=True, default="")
    channel = models.CharField(max_length=100, blank=True, default="")
    person = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    runs = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cache_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=16, decimal_places=6, default=Decimal(0))

    class Meta:
        indexes = [
            # Every usage page query: a period, then grouped.
            models.Index(fields=["day", "gateway"], name="usage_day_period"),
            models.Index(
                fields=["day", "gateway", "agent_key", "model", "channel"],
                name="usage_day_key",
            ),
        ]


class UsageSessionDay(models.Model):
    """The top sessions' rollup: one row per day and gateway session (and agent and model,
    the page's filters), updated in the same transaction as the ledger row. A session
    books many runs a day, so a long range reads far fewer rows than the ledger."""

    day = models.DateField()
    gateway = models.ForeignKey(Gateway, on_delete=models.PROTECT, related_name="+")
    session = models.ForeignKey(
        Session, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    session_key = models.CharField(max_length=512)
    agent_key = models.CharField(max_length=200, blank=True, default="")
    model = models.CharField(max_length=200, blank=True, default="")
    runs = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=16, decimal_places=6, default=Decimal(0))

    class Meta:
        indexes = [
            # The usage page's top sessions over a period: on PostgreSQL an index-only
            # scan (the columns it sums are in the index).
            models.Index(
                fields=["day"],
                include=[
                    "gateway",
                    "session_key",
                    "session",
                    "agent_key",
                    "model",
                    "runs",
                    "input_tokens",
                    "output_tokens",
                    "cost_usd",
                ],
                name="usage_session_day_period",
            ),
            # The ledger's upsert of one row.
            models.Index(
                fields=["gateway", "session_key", "day"], name="usage_session_day_key"
            ),
        ]


class UsageMark(models.Model):
    """What the ledger last booked for one gateway session: the counters (its last run's
    usage) and the run they showed, so a replay costs no write, and the gateway time of
    the newest booked usage, so a catch-up books only the runs after it."""

    gateway = models.ForeignKey(Gateway, on_delete=models.CASCADE, related_name="+")
    session_key = models.CharField(max_length=512)
    gateway_session_id = models.CharField(max_length=200, blank=True, default="")
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal(0))
    # Unused since booking goes by run (kept: older rows have it).
    pending_run_id = models.CharField(max_length=200, blank=True, default="")
    # The run whose usage the counters showed when last booked (the row's `lastRunId`).
    last_run_id = models.CharField(max_length=200, blank=True, default="")
    # The gateway's time (ms) of the newest usage booked for the session: a catch-up books
    # the `sessions.usage.timeseries` points after it (runs that ended while nobody watched).
    point_ms = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["gateway", "session_key"], name="usage_mark_one_per_session"
            )
        ]


class Budget(models.Model):
    """A spending limit an admin set: overall, one gateway's or one agent's, per day or
    month, with thresholds (percent) that each raise one alert per period."""

    class Period(models.TextChoices):
        DAY = "day", "Per day"
        MONTH = "month", "Per month"

    name = models.CharField(max_length=200)
    gateway = models.ForeignKey(
        Gateway,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        help_text="Only this gateway's spend. Blank: every gateway.",
    )
    agent_key = models.CharField(
        "agent id",
        max_length=200,
        blank=True,
        default="",
        help_text="Only this agent's spend (its id, e.g. main). Blank: every agent.",
    )
    period = models.CharField(max_length=10, choices=Period, default=Period.MONTH)
    amount_usd = models.DecimalField("amount (USD)", max_digits=12, decimal_places=2)
    thresholds = models.CharField(
        max_length=100,
        default="80,100",
        help_text="Percentages of the amount that raise an alert, comma-separated.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name", "pk"]

    def __str__(self) -> str:
        return self.name

    def threshold_list(self) -> list[int]:
        found: set[int] = set()
        for part in self.thresholds.replace(";", ",").split(","):
            part = part.strip().rstrip("%")
            if part.isdigit() and 0 < int(part) <= 1000:
                found.add(int(part))
        return sorted(found)
