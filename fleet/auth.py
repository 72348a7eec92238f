"""The authentication backend every login goes through (the accounts login, the admin's,
any later form): Django's ModelBackend with fleet/throttle.py around the password check,
so no login path can skip the throttle."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django import forms
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest

from fleet import throttle
from fleet.audit import client_ip

_VERDICT = "_login_throttle_verdict"


def verdict_of(request: HttpRequest | None) -> throttle.Verdict | None:
    """The throttle's answer to this request's login attempt, if one was made."""
    verdict = getattr(request, _VERDICT, None)
    return verdict if isinstance(verdict, throttle.Verdict) else None


def refused(request: HttpRequest | None) -> throttle.Verdict | None:
    verdict = verdict_of(request)
    return verdict if verdict is not None and not verdict.allowed else None


def too_many_message(verdict: throttle.Verdict) -> str:
    minutes = verdict.minutes
    return (
        f"Too many failed attempts. Try again in {minutes} "
        f"minute{'s' if minutes != 1 else ''}."
    )


class ThrottledModelBackend(ModelBackend):
    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> User | None:
        if not username or password is None:
            return super().authenticate(request, username, password, **kwargs)
        address = client_ip(request)
        verdict = throttle.attempt(username, address)
        if request is not None:
            setattr(request, _VERDICT, verdict)
        if not verdict.allowed:
            # Stops authenticate() at once (no other backend tries) and sends
            # user_login_failed, so the refusal is audited like a failure.
            raise PermissionDenied("too many failed attempts")
        user = super().authenticate(request, username, password, **kwargs)
        if user is not None:
            throttle.succeeded(username, address)
        return user

    async def aauthenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> User | None:
        # ModelBackend's own async version would skip the throttle.
        return await sync_to_async(self.authenticate)(
            request, username, password, **kwargs
        )


class ThrottledLoginFormMixin(forms.Form):
    """For AuthenticationForm subclasses: a refused attempt says so, instead of claiming
    the password was wrong (it was never checked)."""

    request: HttpRequest | None

    def get_invalid_login_error(self) -> ValidationError:
        verdict = refused(self.request)
        if verdict is not None:
            return ValidationError(too_many_message(verdict), code="throttled")
        return super().get_invalid_login_error()  # type: ignore[misc,no-any-return]
