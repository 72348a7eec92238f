"""The gateway's HTTP side, used while the WebSocket is not ready: `/readyz` (no auth) and
`POST /tools/invoke` with the Bearer token for `agents_list` and `sessions_list`.

For https:// it takes the same TLS context as the WebSocket (`fleet.gateway.tls`): the
same trust and the same pin, checked in the handshake, before the token is sent."""

from __future__ import annotations

import json
import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from fleet.gateway.tls import find_tls_failure


class RestError(Exception):
    def __init__(self, message: str, tls: ssl.SSLError | None = None) -> None:
        super().__init__(message)
        # The refused certificate (untrusted, or not the pinned one), when that was why.
        self.tls = tls


def _unreachable(exc: httpx.HTTPError) -> RestError:
    failure = find_tls_failure(exc)
    if failure is not None:
        return RestError(f"TLS refused on the gateway's HTTP side: {failure}", failure)
    return RestError(f"the gateway's HTTP side is unreachable: {exc}")


def rest_base_url(gateway_url: str, rest_url: str = "") -> str:
    """`rest_url` when given (a separate HTTP address), else the gateway's own http(s)
    origin."""
    if rest_url:
        return rest_url.rstrip("/")
    parts = urlsplit(gateway_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


class RestClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.base_url = base_url
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            verify=verify,
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def readyz(self) -> dict[str, Any]:
        try:
            response = await self._client.get("/readyz")
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None
        data = self._json(response)
        if response.status_code != 200:
            raise RestError(f"/readyz answered {response.status_code}")
        return data

    async def invoke(
        self, tool: str, args: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Run a gateway tool; return its structured `result.details`."""
        try:
            response = await self._client.post(
                "/tools/invoke", json={"tool": tool, "args": args or {}}
            )
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None
        if response.status_code == 401:
            raise RestError("the gateway refused the token on /tools/invoke (401)")
        data = self._json(response)
        if response.status_code != 200 or data.get("ok") is not True:
            error = data.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            raise RestError(
                f"{tool} failed ({response.status_code}): {message or 'no reason'}"
            )
        result = data.get("result")
        if not isinstance(result, dict):
            raise RestError(f"{tool}: no result in the answer")
        details = result.get("details")
        if isinstance(details, dict):
            return details
        # Older gateways may only give the JSON as text content.
        for block in result.get("content") or []:
            if isinstance(block, dict) and block.get("type") == "text":
                try:
                    parsed = json.loads(block.get("text") or "")
                except ValueError:
                    continue
                if isinstance(parsed, dict):
                    return parsed
        raise RestError(f"{tool}: the answer has no structured details")

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            raise RestError(
                f"the gateway answered {response.status_code} without JSON"
            ) from None
        if not isinstance(data, dict):
            raise RestError("the gateway answered with JSON that is not an object")
        return data
