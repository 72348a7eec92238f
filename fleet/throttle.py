"""Slowing down repeated failed logins, per account and per address.

Every failed login is an audit event (`login.failed`, with the username tried and the
client address). The throttle counts those rows in a sliding window, so it holds across
daphne processes and restarts without a cache server or a new table, and the record of
attempts doubles as the audit trail. Once an account or an address has too many recent
failures, further attempts are refused (without checking the password) until the oldest
failure in the window ages out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db.models import Min, QuerySet
from django.utils import timezone

from fleet.models import AuditEvent

FAILED = "login.failed"
SUCCEEDED = "login.ok"


def _limits() -> tuple[int, int, timedelta]:
    return (
        int(getattr(settings, "LOGIN_FAILURES_PER_ACCOUNT", 5)),
        int(getattr(settings, "LOGIN_FAILURES_PER_ADDRESS", 20)),
        timedelta(seconds=float(getattr(settings, "LOGIN_FAILURE_WINDOW", 900))),
    )


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # seconds

    @property
    def minutes(self) -> int:
        return max(1, -(-self.retry_after // 60))


def _blocked_for(failures: QuerySet[AuditEvent], limit: int, window: timedelta) -> int:
    """Seconds until this set of failures falls under the limit again (0: not blocked)."""
    if failures.count() < limit:
        return 0
    oldest = failures.aggregate(oldest=Min("created_at"))["oldest"]
    if oldest is None:
        return 0
    return max(1, int((oldest + window - timezone.now()).total_seconds()) + 1)


def check(username: str, ip: str | None) -> Verdict:
    per_account, per_address, window = _limits()
    since = timezone.now() - window
    recent = AuditEvent.objects.filter(action=FAILED, created_at__gte=since)
    wait = 0
    if username:
        wait = _blocked_for(
            recent.filter(username__iexact=username[:150]), per_account, window
        )
    if ip:
        wait = max(wait, _blocked_for(recent.filter(ip=ip), per_address, window))
    return Verdict(allowed=wait == 0, retry_after=wait)


def record_failure(username: str, ip: str | None, detail: str = "") -> None:
    AuditEvent.objects.create(
        action=FAILED,
        username=username[:150],
        ip=ip,
        result=AuditEvent.Result.ERROR,
        detail=detail,
    )
