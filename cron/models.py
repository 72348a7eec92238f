"""Cron jobs and their runs, mirrored from every gateway (runs are kept beyond the
gateway's own window: the gateway's `cron.runs` is a page of its recent history)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from fleet.models import Gateway


class CronJob(models.Model):
    """One job as the gateway last described it (`cron.list` or a `cron` event)."""

    gateway = models.ForeignKey(
        Gateway, on_delete=models.CASCADE, related_name="cron_jobs"
    )
    job_id = models.CharField(max_length=200)
    name = models.CharField(max_length=300, blank=True, default="")
    enabled = models.BooleanField(default=True)
    schedule = models.CharField(max_length=300, blank=True, default="")
    payload_kind = models.CharField(max_length=40, blank=True, default="")
    agent_key = models.CharField(max_length=200, blank=True, default="")
    next_run_at = models.DateTimeField(null=True, blank=True)
    last_status = models.CharField(max_length=20, blank=True, default="")
    last_error = models.TextField(blank=True, default="")
    last_run_at = models.DateTimeField(null=True, blank=True)
    running = models.BooleanField(default=False)
    # Removed on the gateway (an event or a reconcile no longer lists it): kept for its runs.
    removed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["gateway__name", "name", "job_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["gateway", "job_id"], name="cronjob_one_per_gateway"
            )
        ]

    def __str__(self) -> str:
        return self.name or self.job_id

    @property
    def failing(self) -> bool:
        return self.last_status == CronRun.Status.ERROR

    @property
    def badge_class(self) -> str:
        """The CSS class of its state badge (app.css `.badge.ok/.warn/.bad`): a run in
        progress first, then how the last one ended."""
        if self.running:
            return "warn"
        if self.failing:
            return "bad"
        return "ok" if self.last_status == CronRun.Status.OK else ""

    @property
    def state_text(self) -> str:
        if self.running:
            return "running"
        return self.last_status or "never ran"


class CronRun(models.Model):
    """One finished run (`cron.runs` entry or `cron` finished event). Idempotent by
    (gateway, job, ts): the entry's `ts` is the gateway's own key of the run."""

    class Status(models.TextChoices):
        OK = "ok", "OK"
        ERROR = "error", "Error"
        SKIPPED = "skipped", "Skipped"

    gateway = models.ForeignKey(
        Gateway, on_delete=models.CASCADE, related_name="cron_runs"
    )
    job_id = models.CharField(max_length=200)
    job_name = models.CharField(max_length=300, blank=True, default="")
    run_id = models.CharField(max_length=200, blank=True, default="")
    ts = models.BigIntegerField(help_text="The gateway's timestamp of the entry (ms).")
    status = models.CharField(max_length=20, choices=Status)
    completion_status = models.CharField(max_length=40, blank=True, default="")
    delivery_status = models.CharField(max_length=40, blank=True, default="")
    error = models.TextField(blank=True, default="")
    summary = models.TextField(blank=True, default="")
    run_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.BigIntegerField(null=True, blank=True)
    model = models.CharField(max_length=200, blank=True, default="")
    input_tokens = models.BigIntegerField(null=True, blank=True)
    output_tokens = models.BigIntegerField(null=True, blank=True)
    total_tokens = models.BigIntegerField(null=True, blank=True)
    recorded_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-ts", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["gateway", "job_id", "ts"], name="cronrun_one_per_entry"
            )
        ]
        indexes = [
            # The page's history per job, and the alert source's failed runs by time.
            models.Index(fields=["gateway", "job_id", "-ts"], name="cronrun_job"),
            models.Index(fields=["status", "recorded_at"], name="cronrun_status"),
        ]

    def __str__(self) -> str:
        return f"{self.job_name or self.job_id} {self.status}"

    @property
    def failed(self) -> bool:
        return self.status == self.Status.ERROR or _bad_completion(
            self.completion_status
        )

    @property
    def duration_s(self) -> float | None:
        return None if self.duration_ms is None else self.duration_ms / 1000


# Completion statuses that mean the run did not do its work, even under status "ok".
BAD_COMPLETIONS = ("error", "failed", "failure", "timeout", "timed_out", "aborted")


def _bad_completion(value: str) -> bool:
    return value.lower() in BAD_COMPLETIONS
