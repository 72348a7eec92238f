"""The fleet's forms: the fleet page's filter form (it validates the query string of the page,
of its htmx list requests and of the live socket, `/ws/fleet/?status=running&q=...`, the same
way), and the admin's gateway form with its checks of addresses, variable names and TLS."""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from fleet import envrules
from fleet.gateway import (
    PEM_MARKER,
    TlsConfigError,
    format_fingerprint,
    normalize_pin,
)
from fleet.models import Gateway


class SessionFilterForm(forms.Form):
    q = forms.CharField(required=False, max_length=200, strip=True)
    gateway = forms.IntegerField(required=False, min_value=1)
    agent = forms.IntegerField(required=False, min_value=1)
    status = forms.CharField(required=False, max_length=50)
    kind = forms.CharField(required=False, max_length=50)
    channel = forms.CharField(required=False, max_length=100)
    gone = forms.BooleanField(required=False)
    page = forms.IntegerField(required=False, min_value=1, max_value=1_000_000)

    def filters(self) -> dict[str, Any]:
        """The cleaned filters; invalid fields are dropped instead of failing the page."""
        self.is_valid()
        data = getattr(self, "cleaned_data", {})
        return {
            name: data.get(name)
            for name in self.fields
            if name not in self.errors and data.get(name) not in (None, "")
        }


class GatewayForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Gateway
        fields = [
            "name",
            "url",
            "rest_url",
            "token_env",
            "enabled",
            "tls_ca_file",
            "tls_ca_env",
            "tls_pin",
        ]
        labels = {"token_env": "Token environment variable"}
        help_texts = {
            "token_env": "Name of the worker's environment variable that holds this "
            "gateway's token: a name ending in _GATEWAY_TOKEN, or one the deployment "
            "lists in CONTROLCENTER_ALLOWED_ENV.",
            "tls_ca_env": "Or: the name of a worker environment variable holding that CA "
            "as PEM text (or a path to it): a name ending in _CA_BUNDLE, or one listed in "
            "CONTROLCENTER_ALLOWED_ENV.",
        }

    def clean_url(self) -> str:
        url = str(self.cleaned_data["url"]).strip()
        if not url.startswith(("ws://", "wss://", "http://", "https://")):
            raise ValidationError("Use a ws://, wss://, http:// or https:// address.")
        refusal = envrules.url_refusal(url)
        if refusal:
            raise ValidationError(refusal)
        return url

    def clean_rest_url(self) -> str:
        url = str(self.cleaned_data.get("rest_url") or "").strip()
        if url and not url.startswith(("http://", "https://")):
            raise ValidationError(
                "Use an http:// or https:// address, or leave it blank."
            )
        refusal = envrules.url_refusal(url, "The REST fallback address") if url else ""
        if refusal:
            raise ValidationError(refusal)
        return url

    def clean_token_env(self) -> str:
        name = validate_token_env(str(self.cleaned_data["token_env"]))
        refusal = envrules.env_name_refusal(name, envrules.TOKEN)
        if refusal:
            raise ValidationError(refusal)
        return name

    def clean_tls_ca_file(self) -> str:
        path = str(self.cleaned_data.get("tls_ca_file") or "").strip()
        if PEM_MARKER in path or "\n" in path:
            raise ValidationError(
                "Type the path of the PEM file here; to give the certificate itself, put "
                "it in an environment variable of the worker and name that below."
            )
        if path and not path.startswith("/"):
            raise ValidationError(
                "Use an absolute path on the worker, e.g. /etc/ssl/gateway-ca.pem."
            )
        return path

    def clean_tls_ca_env(self) -> str:
        name = str(self.cleaned_data.get("tls_ca_env") or "").strip()
        if PEM_MARKER in name:
            raise ValidationError(
                "Put the certificate in the worker's environment and type only the "
                "variable's name here, e.g. GATEWAY_CA_BUNDLE."
            )
        if name and not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            raise ValidationError(
                "An environment variable name: upper-case letters, digits and underscores."
            )
        refusal = envrules.env_name_refusal(name, envrules.CA_BUNDLE) if name else ""
        if refusal:
            raise ValidationError(refusal)
        return name

    def clean_tls_pin(self) -> str:
        raw = str(self.cleaned_data.get("tls_pin") or "").strip()
        try:
            pin = normalize_pin(raw)
        except TlsConfigError as exc:
            raise ValidationError(str(exc)) from None
        return format_fingerprint(pin) if pin else ""

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("tls_ca_file") and data.get("tls_ca_env"):
            self.add_error(
                "tls_ca_env", "Name the CA bundle by a path or by a variable, not both."
            )
        url = str(data.get("url") or "")
        rest_url = str(data.get("rest_url") or "")
        tls_set = (
            data.get("tls_ca_file") or data.get("tls_ca_env") or data.get("tls_pin")
        )
        if (
            tls_set
            and url
            and not url.startswith(("wss://", "https://"))
            and not rest_url.startswith("https://")
        ):
            self.add_error(
                "url",
                "TLS settings apply to wss:// and https:// addresses only: use wss:// "
                "(or clear the TLS fields).",
            )
        return data


def validate_token_env(value: str) -> str:
    """The NAME of an environment variable, never a token: upper-case words joined by
    underscores. Long runs of digits or long unbroken strings look like a pasted secret."""
    name = value.strip()
    secret_hint = (
        "That looks like a token itself. Put the token in the worker's environment "
        "and type only the variable's name here, e.g. OPENCLAW_GATEWAY_TOKEN."
    )
    if not name:
        raise ValidationError("Name the environment variable that holds the token.")
    if (
        not all(c.isascii() and (c.isalnum() or c == "_") for c in name)
        or name[0].isdigit()
    ):
        if any(c in name for c in "-.+/=") or len(name) >= 20:
            raise ValidationError(secret_hint)
        raise ValidationError(
            "An environment variable name has only letters, digits and underscores, "
            "and does not start with a digit."
        )
    if name != name.upper():
        if (
            sum(c.isupper() for c in name)
            and sum(c.islower() for c in name)
            and len(name) >= 16
        ):
            raise ValidationError(secret_hint)
        raise ValidationError(
            "Use the upper-case name of the variable, e.g. OPENCLAW_GATEWAY_TOKEN."
        )
    longest_word = max(len(part) for part in name.split("_"))
    digits = sum(c.isdigit() for c in name)
    if longest_word >= 24 or digits >= 6:
        raise ValidationError(secret_hint)
    return name
