"""Slowing down repeated failed logins without letting a stranger lock anyone out.

Failures are counted per (account, address) in `LoginThrottle` rows. After
`LOGIN_FAILURES_PER_ACCOUNT` failures of one account from one address, each further
attempt from there waits a growing delay (`LOGIN_FAILURE_DELAY` seconds, doubling, at most
`LOGIN_FAILURE_WINDOW`). An address that failed on `LOGIN_ACCOUNTS_PER_ADDRESS` different
accounts lately may try no further account. A correct password from an address that has
not been failing is always accepted: guesses from elsewhere never block the real user.

The account is the username as Django authenticates it (stripped and NFKC-normalised by
the login form), case-folded: "vic ", "ｖｉｃ" and "VIC" are one account here. Folding can
only merge buckets of the same address, so it never blocks anyone more than the guesses
they made themselves.

Counting and checking are one step: `attempt()` counts an attempt, inside one transaction
holding the address's row lock, before the password is checked; `succeeded()` clears the
count after a correct password. So 12 concurrent wrong guesses count 12, and only the
first `LOGIN_FAILURES_PER_ACCOUNT` of them get their password checked. The audit log
(`login.failed` events, fleet/audit.py) keeps the record of every attempt."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Min
from django.utils import timezone

from fleet.models import LoginThrottle

FAILED = "login.failed"
SUCCEEDED = "login.ok"
REFUSED_DETAIL = "refused without checking the password: too many failed attempts"


def _setting(name: str, default: float) -> float:
    return float(getattr(settings, name, default))


def account_key(username: str) -> str:
    """The throttle's name for an account: as the login form hands it to authenticate()
    (stripped, NFKC), then case-folded (and NFKC again: folding can denormalise)."""
    name = unicodedata.normalize("NFKC", username).strip()
    return unicodedata.normalize("NFKC", name.casefold())[:150]


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # seconds

    @property
    def minutes(self) -> int:
        return max(1, -(-self.retry_after // 60))


def _seconds_until(moment: datetime, now: datetime) -> int:
    return max(1, int((moment - now).total_seconds()) + 1)


def _delay(excess: int) -> timedelta:
    """The wait after the `excess`-th failure beyond the free ones (0: the first)."""
    base = _setting("LOGIN_FAILURE_DELAY", 30)
    cap = _setting("LOGIN_FAILURE_WINDOW", 900)
    return timedelta(seconds=min(cap, base * 2 ** min(excess, 30)))


def attempt(username: str, address: str | None) -> Verdict:
    """Count one login attempt of `username` from `address`, and say whether its password
    may be checked. Refused attempts count too (they are failures the caller records)."""
    key = account_key(username)
    addr = address or ""
    now = timezone.now()
    window = timedelta(seconds=_setting("LOGIN_FAILURE_WINDOW", 900))
    since = now - window
    free = int(_setting("LOGIN_FAILURES_PER_ACCOUNT", 5))
    accounts_per_address = int(_setting("LOGIN_ACCOUNTS_PER_ADDRESS", 10))
    rows = LoginThrottle.objects.select_for_update()
    with transaction.atomic():
        # The address's row first: attempts from one address are counted one at a time.
        gate, _ = rows.get_or_create(account="", address=addr)
        LoginThrottle.objects.filter(address=addr, last_failure_at__lt=since).exclude(
            account=""
        ).delete()
        row, _ = rows.get_or_create(account=key, address=addr)
        if row.blocked_until is not None and row.blocked_until > now:
            row.failures += 1
            row.last_failure_at = now
            row.save(update_fields=["failures", "last_failure_at"])
            return Verdict(False, _seconds_until(row.blocked_until, now))
        if row.failures == 0:
            # A new account for this address: within the address's limit?
            tried = LoginThrottle.objects.filter(
                address=addr, last_failure_at__gte=since, failures__gt=0
            ).exclude(account="")
            if tried.count() >= accounts_per_address:
                row.delete()
                gate.failures += 1
                gate.last_failure_at = now
                gate.save(update_fields=["failures", "last_failure_at"])
                oldest = tried.aggregate(oldest=Min("last_failure_at"))["oldest"]
                return Verdict(False, _seconds_until((oldest or now) + window, now))
        row.failures += 1
        row.last_failure_at = now
        if row.failures >= free:
            row.blocked_until = now + _delay(row.failures - free)
        row.save(update_fields=["failures", "last_failure_at", "blocked_until"])
        return Verdict(True)


def succeeded(username: str, address: str | None) -> None:
    """A correct password: this account's count from this address starts over."""
    LoginThrottle.objects.filter(
        account=account_key(username), address=address or ""
    ).delete()
