"""Client addresses behind a reverse proxy, trusted only from the proxies the deployment
names (CONTROLCENTER_TRUSTED_PROXIES).

daphne's own `--proxy-headers` believes X-Forwarded-For from anyone who can reach it, so a
client could pick the address the throttle counts and the audit log records. This ASGI
middleware does it instead, for HTTP and WebSocket scopes alike: when the peer is a trusted
proxy, the client is the last hop a trusted proxy added (X-Forwarded-For read from the
right, skipping trusted proxies), and X-Forwarded-Proto sets the scheme. From any other
peer both headers are removed, so neither Django's SECURE_PROXY_SSL_HEADER nor anything
else can read a forged one."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
STRIPPED = (b"x-forwarded-for", b"x-forwarded-proto")


def parse_networks(entries: Iterable[str]) -> list[Network]:
    """Addresses or networks ("10.0.0.5", "10.0.0.0/8", "::1"); ValueError on others."""
    return [ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip()]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


class TrustedProxyMiddleware:
    def __init__(self, app: Any, trusted: Iterable[str]) -> None:
        self.app = app
        self.trusted = parse_networks(trusted)

    def is_trusted(self, address: str) -> bool:
        ip = _address(address)
        return ip is not None and any(ip in net for net in self.trusted)

    def rewrite(self, scope: dict[str, Any]) -> dict[str, Any]:
        headers = list(scope.get("headers") or [])
        kept = [(k, v) for k, v in headers if k.lower() not in STRIPPED]
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        if not self.trusted or not self.is_trusted(peer):
            return {**scope, "headers": kept}
        hops = [
            hop.strip()
            for k, v in headers
            if k.lower() == b"x-forwarded-for"
            for hop in v.decode("latin-1").split(",")
            if hop.strip()
        ]
        address = peer
        while hops and self.is_trusted(address):
            hop = hops.pop()
            if _address(hop) is None:
                break  # not an address a proxy writes: keep the proxy's own
            address = str(_address(hop))
        rewritten = {**scope, "headers": headers}
        if address != peer:
            rewritten["client"] = (address, 0)
        protos = [v for k, v in headers if k.lower() == b"x-forwarded-proto"]
        if protos:
            proto = protos[-1].decode("latin-1").split(",")[-1].strip().lower()
            if proto in ("http", "https"):
                secure = proto == "https"
                if scope["type"] == "websocket":
                    rewritten["scheme"] = "wss" if secure else "ws"
                else:
                    rewritten["scheme"] = proto
        return rewritten

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] in ("http", "websocket"):
            scope = self.rewrite(scope)
        return await self.app(scope, receive, send)
