"""The rule fields that touch secrets: the webhook's signing-secret *name* and its URL.

Project rule: a settings field names an environment variable and never holds a secret, and
only names the deployment allows can be named. `allowed_secret_env_name` is the alerts'
half of that check (the lead folds it into fleet's shared allowed-env-name function for
`_GATEWAY_TOKEN`/`_CA_BUNDLE` names). No message here quotes a variable's value or a
whole webhook URL (a Slack URL carries its token in the path)."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

WEBHOOK_SECRET_SUFFIX = "_WEBHOOK_SECRET"
_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,99}$")


def allowed_secret_env_name(name: str) -> bool:
    """An upper-case environment variable name ending in _WEBHOOK_SECRET."""
    return bool(_ENV_NAME.match(name)) and name.endswith(WEBHOOK_SECRET_SUFFIX)


def validate_secret_env_name(name: str) -> None:
    if name and not allowed_secret_env_name(name):
        raise ValidationError(
            "Name an environment variable of the worker in capitals, ending in "
            f"{WEBHOOK_SECRET_SUFFIX} (e.g. OPS_WEBHOOK_SECRET); put the secret itself "
            "in the worker's environment, not here."
        )


def secret_from_env(name: str) -> bytes:
    """The secret's bytes; a clear error naming the variable (never its value)."""
    if not allowed_secret_env_name(name):
        raise ValueError(f"{name[:100]!r} is not an allowed secret variable name")
    value = os.environ.get(name, "")
    if not value:
        raise ValueError(
            f"the worker's environment variable {name} is not set: the webhook cannot "
            "be signed"
        )
    return value.encode()


def validate_webhook_url(url: str) -> None:
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("The webhook URL must be an http:// or https:// URL.")
    if parts.username is not None or parts.password is not None:
        raise ValidationError(
            "The webhook URL must not carry a user or password; sign it with a secret "
            "instead."
        )
    if any(c.isspace() for c in url):
        raise ValidationError("The webhook URL must not contain spaces.")


def mask_url(url: str) -> str:
    """Scheme and host (and port) only: what pages and log lines may show."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid URL)"
    return f"{parts.scheme}://{host}{port}/…"


def scrub(text: str, url: str) -> str:
    """An error text with the URL (and its path, which may be the token) cut out."""
    if not url:
        return text
    parts = urlsplit(url)
    masked = mask_url(url)
    text = text.replace(url, masked)
    for piece in (parts.path + ("?" + parts.query if parts.query else ""), parts.path):
        if len(piece) > 1:
            text = text.replace(piece, "/…")
    return text
