"""Where a client may send a gateway token: pure checks of an address, no environment.

- An address holds no user:password and no query string (`url_shape_refusal`); messages and
  logs use `safe_url()`, which drops them.
- No plain-text token to a foreign host (`url_refusal`): ws:// and http:// only to loopback
  or to a host the caller names in `insecure_hosts` (e.g. a private network it trusts).

The caller decides which hosts are allowed and how its own messages name the remedy (the
keyword texts); these functions only check and word the refusal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from urllib.parse import urlsplit

PLAIN_SCHEMES = ("ws", "http")
# How a refusal names the remedy, unless the caller words it for its own deployment.
AUTH_NOTE = "the gateway authenticates with its token, not with the address"
INSECURE_NOTE = "allow the host as an insecure host of this client"


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


def normalize_host(host: str) -> str:
    """A host name as `url_refusal` compares it: lower case, no brackets, no final dot."""
    return host.lower().strip().strip("[]").rstrip(".")


def url_shape_refusal(
    url: str, what: str = "The gateway address", *, auth_note: str = AUTH_NOTE
) -> str:
    """Why `url` cannot be stored or used as it is (credentials or a query in it), or ""."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        return f"{what} cannot be parsed."
    if "@" in parts.netloc:
        return f"{what} may not hold a user name or password (user:password@): {auth_note}."
    if parts.query or parts.fragment:
        return f"{what} may not hold a query string (?...) or a fragment (#...)."
    return ""


def url_refusal(
    url: str,
    what: str = "The gateway address",
    *,
    insecure_hosts: Collection[str] = (),
    auth_note: str = AUTH_NOTE,
    insecure_note: str = INSECURE_NOTE,
) -> str:
    """Why a client may not send the token to `url`, or "" when it may. `insecure_hosts`
    (compared after `normalize_host`) may be reached over plain ws:// and http://."""
    shape = url_shape_refusal(url, what, auth_note=auth_note)
    if shape:
        return shape
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    allowed = {normalize_host(h) for h in insecure_hosts}
    if parts.scheme in PLAIN_SCHEMES and not (
        is_loopback(host) or host.rstrip(".") in allowed
    ):
        secure = "wss" if parts.scheme == "ws" else "https"
        return (
            f"{what} {safe_url(url)} is plain {parts.scheme}:// to a host off loopback: "
            f"the token would cross the network in clear. Use {secure}://, or, when the "
            f"network itself is private (a VPN, the Docker host), {insecure_note}."
        )
    return ""
