"""What a gateway's settings may point the worker at: this deployment's rules over the
client library's pure checks (`fleet.gateway.guard`, `fleet.gateway.tls`). One rule each,
shared by the admin form (which refuses a bad setting with these words) and the worker
(which checks again before it reads a variable or sends the token, so a row written around
the form is refused too).

- Only gateway-token and CA-bundle variables can be named: by default names ending in
  `_GATEWAY_TOKEN` (a token) and `_CA_BUNDLE` (a CA bundle); or exactly the names listed in
  `CONTROLCENTER_ALLOWED_ENV` (comma-separated). The Control Center's own secrets never.
- No plain-text token to a foreign host: ws:// and http:// only to loopback or to a host
  named in `CONTROLCENTER_INSECURE_HOSTS` (comma-separated).
- An address holds no user:password and no query string; messages use `safe_url()`.

Both variables are read when asked (not at import), in the process that asks: the web
process for the form, the worker for the connection. This is the one place where a
gateway's settings lead to `os.environ`.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from fleet.gateway import (
    PEM_MARKER,
    PinnedSSLContext,
    TlsConfigError,
    TlsSettings,
    guard,
    normalize_pin,
    safe_url,
)
from fleet.gateway import (
    tls_context as client_tls_context,
)
from fleet.gateway import (
    tls_failure_text as client_tls_failure_text,
)

__all__ = [
    "CA_BUNDLE",
    "DISPLAY_NAME",
    "TOKEN",
    "USER_AGENT",
    "GatewayTls",
    "allowed_env_names",
    "env_name_refusal",
    "insecure_hosts",
    "read_env",
    "safe_url",
    "tls_context",
    "tls_failure_text",
    "url_refusal",
    "url_shape_refusal",
]

# How the Control Center introduces itself to a gateway (its device list shows the name).
DISPLAY_NAME = "OpenClaw Control Center"
USER_AGENT = "openclaw-control-center/0.1.0"

TOKEN = "token"
CA_BUNDLE = "CA bundle"
DEFAULT_SUFFIXES = {TOKEN: "_GATEWAY_TOKEN", CA_BUNDLE: "_CA_BUNDLE"}
# The Control Center's own secrets: never named by a gateway, even when listed.
NEVER = frozenset(
    {
        "DJANGO_SECRET_KEY",
        "DJANGO_SECRET_KEY_FILE",
        "DATABASE_URL",
        "REDIS_URL",
        "POSTGRES_PASSWORD",
        "CONTROLCENTER_ADMIN_PASSWORD",
    }
)
# How the refusals name this deployment's remedies.
AUTH_NOTE = "the gateway authenticates with the token from the worker's environment"
INSECURE_NOTE = (
    "name the host in CONTROLCENTER_INSECURE_HOSTS (of the web and of the worker)"
)
CA_ADVICE = (
    "For a self-signed or private CA, name its CA bundle on the gateway (a path or an "
    "environment variable)."
)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def allowed_env_names() -> list[str]:
    return _split(os.environ.get("CONTROLCENTER_ALLOWED_ENV", ""))


def insecure_hosts() -> set[str]:
    hosts = _split(os.environ.get("CONTROLCENTER_INSECURE_HOSTS", ""))
    return {guard.normalize_host(host) for host in hosts}


def env_name_refusal(name: str, kind: str) -> str:
    """Why a gateway may not name the variable `name` for its `kind` (TOKEN or CA_BUNDLE),
    or "" when it may. Never reads the variable."""
    allowed = allowed_env_names()
    if name in NEVER or (
        name not in allowed if allowed else not name.endswith(DEFAULT_SUFFIXES[kind])
    ):
        rule = (
            "the names listed in CONTROLCENTER_ALLOWED_ENV"
            if allowed
            else f"names ending in {DEFAULT_SUFFIXES[kind]}"
        )
        return (
            f"{name} is not a variable this deployment lets a gateway's {kind} come "
            f"from: only {rule} can be named (so no other secret of the worker can be "
            "read through a gateway's settings)."
        )
    return ""


def read_env(name: str, kind: str) -> str:
    """The value of `name` when the rule allows it for `kind`; "" otherwise (the worker
    reports the refusal itself, see `env_name_refusal`)."""
    if not name or env_name_refusal(name, kind):
        return ""
    return os.environ.get(name, "")


def url_shape_refusal(url: str, what: str = "The gateway address") -> str:
    """Why `url` cannot be stored or used as it is (credentials or a query in it), or ""."""
    return guard.url_shape_refusal(url, what, auth_note=AUTH_NOTE)


def url_refusal(url: str, what: str = "The gateway address") -> str:
    """Why the worker may not send the token to `url`, or "" when it may."""
    return guard.url_refusal(
        url,
        what,
        insecure_hosts=insecure_hosts(),
        auth_note=AUTH_NOTE,
        insecure_note=INSECURE_NOTE,
    )


# -- TLS: the gateway row's settings, resolved against the worker's disk and environment --


@dataclass(frozen=True)
class GatewayTls:
    """One gateway's TLS settings as stored on the Gateway row: a CA bundle by path or by
    the name of a variable (holding PEM text, or a path to it), and a pin."""

    ca_file: str = ""  # a PEM bundle on the worker's disk
    ca_env: str = ""  # an environment variable holding PEM text, or a path to it
    pin: str = ""  # as typed; normalised when the context is made

    @property
    def custom(self) -> bool:
        return bool(self.ca_file or self.ca_env or self.pin)

    def described(self) -> TlsSettings:
        """The client's settings that name the same trust, for words (nothing read)."""
        return TlsSettings(
            ca_file=self.ca_file,
            ca_name=f"${self.ca_env}" if self.ca_env and not self.ca_file else "",
            pin=self.pin,
        )

    def describe(self) -> str:
        """In words, for the admin and the logs (no paths' contents, no secrets)."""
        return self.described().describe()


def tls_context(settings: GatewayTls) -> PinnedSSLContext:
    """The client context for these settings: the named variable is checked against the
    rule, then read here (the client library reads no environment). Raises TlsConfigError
    when a setting cannot be used."""
    normalize_pin(
        settings.pin
    )  # a malformed pin is refused first, whatever else is set
    if settings.ca_file:
        if not Path(settings.ca_file).exists():
            raise TlsConfigError(
                f"the CA bundle {settings.ca_file} does not exist on the worker."
            )
        return client_tls_context(
            TlsSettings(ca_file=settings.ca_file, pin=settings.pin)
        )
    if not settings.ca_env:
        return client_tls_context(TlsSettings(pin=settings.pin))
    refusal = env_name_refusal(settings.ca_env, CA_BUNDLE)
    if refusal:
        raise TlsConfigError(refusal)
    value = read_env(settings.ca_env, CA_BUNDLE).strip()
    if not value:
        raise TlsConfigError(
            f"{settings.ca_env} is not set in the worker's environment (it should hold "
            "the gateway's CA certificate as PEM, or a path to it)."
        )
    # PEM text, or else a path to a bundle. Never quote the value, nor a path taken from
    # it (the client's own words would): the words name the variable.
    given = (
        TlsSettings(ca_pem=value, ca_name=f"${settings.ca_env}", pin=settings.pin)
        if PEM_MARKER in value
        else TlsSettings(ca_file=value, pin=settings.pin)
    )
    try:
        return client_tls_context(given)
    except TlsConfigError:
        raise TlsConfigError(
            f"The variable {settings.ca_env} holds neither a PEM bundle nor a readable "
            "file."
        ) from None


def tls_failure_text(exc: ssl.SSLError, settings: GatewayTls | None = None) -> str:
    """Plain words for a refused certificate, naming what to change."""
    return client_tls_failure_text(
        exc,
        settings.described() if settings is not None else None,
        advice=CA_ADVICE,
    )
