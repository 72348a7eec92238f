"""What a gateway's settings may point the worker at. One rule each, shared by the admin
form (which refuses a bad setting with these words) and the worker (which checks again
before it reads a variable or sends the token, so a row written around the form is refused
too).

- Only gateway-token and CA-bundle variables can be named: by default names ending in
  `_GATEWAY_TOKEN` (a token) and `_CA_BUNDLE` (a CA bundle); or exactly the names listed in
  `CONTROLCENTER_ALLOWED_ENV` (comma-separated). The Control Center's own secrets never.
- No plain-text token to a foreign host: ws:// and http:// only to loopback or to a host
  named in `CONTROLCENTER_INSECURE_HOSTS` (comma-separated).
- An address holds no user:password and no query string; messages use `safe_url()`.

Both variables are read when asked (not at import), in the process that asks: the web
process for the form, the worker for the connection.
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

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
PLAIN_SCHEMES = ("ws", "http")


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def allowed_env_names() -> list[str]:
    return _split(os.environ.get("CONTROLCENTER_ALLOWED_ENV", ""))


def insecure_hosts() -> set[str]:
    hosts = _split(os.environ.get("CONTROLCENTER_INSECURE_HOSTS", ""))
    return {host.lower().strip("[]").rstrip(".") for host in hosts}


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


def safe_url(url: str) -> str:
    """The address without user:password, query string or fragment, for messages and the
    audit trail."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(an address that cannot be parsed)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_shape_refusal(url: str, what: str = "The gateway address") -> str:
    """Why `url` cannot be stored or used as it is (credentials or a query in it), or ""."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        return f"{what} cannot be parsed."
    if "@" in parts.netloc:
        return (
            f"{what} may not hold a user name or password (user:password@): the gateway "
            "authenticates with the token from the worker's environment."
        )
    if parts.query or parts.fragment:
        return f"{what} may not hold a query string (?...) or a fragment (#...)."
    return ""


def url_refusal(url: str, what: str = "The gateway address") -> str:
    """Why the worker may not send the token to `url`, or "" when it may."""
    shape = url_shape_refusal(url, what)
    if shape:
        return shape
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme in PLAIN_SCHEMES and not (
        is_loopback(host) or host.rstrip(".") in insecure_hosts()
    ):
        secure = "wss" if parts.scheme == "ws" else "https"
        return (
            f"{what} {safe_url(url)} is plain {parts.scheme}:// to a host off loopback: "
            f"the token would cross the network in clear. Use {secure}://, or, when the "
            "network itself is private (a VPN, the Docker host), name the host in "
            "CONTROLCENTER_INSECURE_HOSTS (of the web and of the worker)."
        )
    return ""
