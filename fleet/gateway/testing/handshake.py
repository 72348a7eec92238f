"""The handshake and pairing: a connect is checked (params, protocol, startup, client, origin),
authenticated (shared token, device token, device signature), paired or refused with a pairing
request, and answered with hello-ok and the events a real gateway sends after it."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from fleet.gateway.identity import verify_device_signature
from fleet.gateway.protocol import (
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TRY_AGAIN_LATER,
    Request,
)
from fleet.gateway.testing import data
from fleet.gateway.testing.core import (
    ADMIN,
    MAX_BUFFERED,
    MAX_PAYLOAD,
    PAIRING,
    Conn,
    Device,
    Refusal,
    RpcError,
    invalid,
    now_ms,
)
from fleet.gateway.testing.runs import Runs
from fleet.gateway.testing.schema import check, connect_schema

SIGNATURE_SKEW_MS = 2 * 60 * 1000

_V4_EVENTS = [
    "connect.challenge",
    "agent",
    "chat",
    "session.message",
    "session.tool",
    "sessions.changed",
    "presence",
    "tick",
    "shutdown",
    "health",
    "heartbeat",
    "cron",
    "task",
    "device.pair.requested",
    "device.pair.resolved",
    "update.available",
]

_V3_EVENTS = [e for e in _V4_EVENTS if e != "task"]

_TOKEN_MISSING = (
    "unauthorized: gateway token missing (paste in Control UI settings or "
    "openclaw doctor --generate-gateway-token; restart)"
)

_TOKEN_MISMATCH = {
    4: "unauthorized: gateway token mismatch (open the dashboard URL and paste the token in Control UI settings)",
    3: "unauthorized: gateway token mismatch (provide gateway auth token)",
}


class Handshake(Runs):
    """The connect, its refusals, pairing and hello-ok."""

    def _connect(self, conn: Conn, req: Request) -> None:
        """Check, authenticate and authorize a connect, then accept it (hello-ok); a
        refusal raises Refusal (the error `res`, then the close)."""
        p = req.params
        self._check_offer(conn, p)
        client: dict[str, Any] = p["client"]
        auth: dict[str, Any] = p.get("auth") or {}
        device: dict[str, Any] | None = p.get("device")
        shared_ok, issued = self._authenticate(auth, device)
        if device is None and issued is None and client["id"] == "openclaw-control-ui":
            raise Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    "control ui requires device identity (use HTTPS or localhost secure context)",
                    details={"code": "CONTROL_UI_DEVICE_IDENTITY_REQUIRED"},
                )
            )
        role = str(p.get("role", "operator"))
        scopes, record = self._authorize(conn, p, role, auth, device, issued)
        self._accept(conn, req, role, scopes, device, issued, record, shared_ok)

    def _check_offer(self, conn: Conn, p: dict[str, Any]) -> None:
        """What is refused before any credential is looked at: bad params, a protocol
        outside the client's range, a gateway still starting, an unknown role, a stale
        Control UI build, a foreign Origin."""
        errors = check(connect_schema(self.protocol), p)
        if errors:
            raise Refusal(invalid("invalid connect params: " + "; ".join(errors)))
        lo, hi = int(p["minProtocol"]), int(p["maxProtocol"])
        if not lo <= self.protocol <= hi:
            details: dict[str, Any] = {
                "code": "PROTOCOL_MISMATCH",
                "expectedProtocol": self.protocol,
            }
            if self.protocol >= 4:
                details.update(
                    clientMinProtocol=lo, clientMaxProtocol=hi, minimumProbeProtocol=3
                )
            raise Refusal(
                RpcError("INVALID_REQUEST", "protocol mismatch", details=details),
                CLOSE_PROTOCOL_ERROR,
            )
        if self._fail_connects > 0:
            self._fail_connects -= 1
            raise Refusal(
                RpcError(
                    "UNAVAILABLE",
                    "gateway starting; retry shortly",
                    retryable=True,
                    retry_after_ms=self._fail_retry_after_ms,
                    details={"reason": "startup-sidecars"},
                ),
                CLOSE_TRY_AGAIN_LATER,
                "gateway starting",
            )
        client: dict[str, Any] = p["client"]
        if str(p.get("role", "operator")) not in ("operator", "node"):
            raise Refusal(invalid("invalid role"))
        if (
            self.protocol >= 4
            and str(client["id"]) == "openclaw-control-ui"
            and client.get("buildId") not in (self.build_id, "dev")
        ):
            raise Refusal(
                RpcError(
                    "UNAVAILABLE",
                    "protocol mismatch: Control UI updated; reload this page to continue",
                    details={
                        "code": "PROTOCOL_MISMATCH",
                        "gatewayBuildId": self.build_id,
                        "reloadRequired": True,
                    },
                )
            )
        if conn.origin is not None and not _loopback_origin(conn.origin):
            raise Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    "origin not allowed (open the Control UI from the gateway host or allow it "
                    "in gateway.controlUi.allowedOrigins)",
                    details={
                        "code": "CONTROL_UI_ORIGIN_NOT_ALLOWED",
                        "reason": "origin not allowed",
                    },
                )
            )

    def _authenticate(
        self, auth: dict[str, Any], device: dict[str, Any] | None
    ) -> tuple[bool, Device | None]:
        """(the shared token matched, the paired device whose token was given)."""
        token, device_token = auth.get("token"), auth.get("deviceToken")
        shared_ok = isinstance(token, str) and secrets.compare_digest(
            token.encode(), self._token.encode()
        )
        issued: Device | None = None
        if not shared_ok:
            for candidate in (device_token, token):
                if candidate and candidate in self._device_tokens:
                    issued = self._device_tokens[candidate]
                    break
        if not shared_ok and issued is None:
            if device_token and not token:
                raise _device_token_mismatch()  # stale or revoked
            self._auth_failure(bool(token or device_token or auth.get("password")))
        if (
            issued is not None
            and device is not None
            and device.get("id") != issued.device_id
        ):
            raise _device_token_mismatch()  # another device's token
        return shared_ok, issued

    def _authorize(
        self,
        conn: Conn,
        p: dict[str, Any],
        role: str,
        auth: dict[str, Any],
        device: dict[str, Any] | None,
        issued: Device | None,
    ) -> tuple[list[str], Device | None]:
        """The scopes the connection gets and its device record: a signed device is paired
        (or, with pairing on, refused with a pairing request), a device token keeps its
        device's scopes, a device-less operator may keep none."""
        client: dict[str, Any] = p["client"]
        client_id, mode = str(client["id"]), str(client["mode"])
        scopes = [str(s) for s in p.get("scopes") or []]
        record: Device | None = issued
        if device is not None:
            self._verify_device(conn, device, client, role, scopes, auth)
            device_id = str(device["id"])
            record = self._devices.get(device_id)
            upgrade = ""
            if record is not None and self.pairing:
                if role != record.role:
                    upgrade = "role-upgrade"
                elif ADMIN not in record.scopes and not set(scopes) <= set(
                    record.scopes
                ):
                    upgrade = "scope-upgrade"
            if (record is None and self.pairing) or upgrade:
                reason = upgrade or "not-paired"
                request_id = self._request_pairing(
                    device, client, role, scopes, reason=reason
                )
                # Shaped like the real gateway's answer (2026.9.6, seen off loopback).
                raise Refusal(
                    RpcError(
                        "NOT_PAIRED",
                        "pairing required: device is not approved yet"
                        if reason == "not-paired"
                        else f"pairing required: {reason}",
                        details={
                            "code": "PAIRING_REQUIRED",
                            "reason": reason,
                            "requestId": request_id,
                            "remediationHint": "Approve this device from the pending pairing requests.",
                            "deviceId": device_id,
                            "requestedRole": role,
                            "requestedScopes": list(scopes),
                        },
                    ),
                    CLOSE_POLICY,
                    "pairing required",
                )
            # Loopback auto-approval; a protocol-3 backend client skips pairing entirely.
            if (record is None or record.role != role) and not (
                self.protocol < 4 and (client_id, mode) == ("gateway-client", "backend")
            ):
                record = self._pair(device_id, str(device["publicKey"]), role, scopes)
        elif issued is not None:
            scopes = [s for s in scopes if s in issued.scopes or ADMIN in issued.scopes]
        elif self.protocol < 4 or conn.origin is not None or mode == "webchat":
            scopes = []  # a device-less operator keeps no scopes (v3; v4 with an Origin)
        return scopes, record

    def _accept(
        self,
        conn: Conn,
        req: Request,
        role: str,
        scopes: list[str],
        device: dict[str, Any] | None,
        issued: Device | None,
        record: Device | None,
        shared_ok: bool,
    ) -> None:
        p = req.params
        client: dict[str, Any] = p["client"]
        conn.authed = True
        conn.role = role
        conn.scopes = tuple(scopes)
        conn.client = dict(client)
        conn.caps = frozenset(str(c) for c in p.get("caps") or [])
        conn.device_id = (
            str(device["id"])
            if device is not None
            else (issued.device_id if issued else None)
        )
        conn.auth_method = "token" if shared_ok else "device-token"
        conn.shared_token = self._token if shared_ok else None
        conn.connected_at = now_ms()
        if conn.timer is not None:
            conn.timer.cancel()
        if str(client["mode"]) != "cli":
            self._presence[conn.number] = self._presence_entry(conn)
            self._state_version["presence"] += 1
        self._respond(conn, req.id, self._hello(conn, record))
        # What a real gateway sends right after hello-ok.
        if self.protocol >= 4:
            self._broadcast(
                "presence", {"presence": self._presence_list()}, state_version=True
            )
            self._state_version["health"] += 1
            self._broadcast(
                "health", self._health_summary(), state_version=True, targets=[conn]
            )
        else:
            self._state_version["health"] += 1
            self._broadcast("health", self._health_summary(), state_version=True)

    def _auth_failure(self, token_given: bool) -> None:
        if not token_given:
            raise Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    _TOKEN_MISSING,
                    details={
                        "code": "AUTH_TOKEN_MISSING",
                        "authReason": "token_missing",
                        "canRetryWithDeviceToken": False,
                        "recommendedNextStep": "update_auth_configuration",
                    },
                )
            )
        v4 = self.protocol >= 4
        raise Refusal(
            RpcError(
                "INVALID_REQUEST",
                _TOKEN_MISMATCH[4 if v4 else 3],
                details={
                    "code": "AUTH_TOKEN_MISMATCH",
                    "authReason": "token_mismatch",
                    "canRetryWithDeviceToken": v4,
                    "recommendedNextStep": "retry_with_device_token"
                    if v4
                    else "update_auth_credentials",
                },
            )
        )

    def _verify_device(
        self,
        conn: Conn,
        device: dict[str, Any],
        client: dict[str, Any],
        role: str,
        scopes: list[str],
        auth: dict[str, Any],
    ) -> None:
        signed_token = (
            auth.get("token")
            or auth.get("deviceToken")
            or auth.get("bootstrapToken")
            or ""
        )
        ok = device.get("nonce") == conn.nonce and verify_device_signature(
            device,
            client_id=str(client["id"]),
            client_mode=str(client["mode"]),
            role=role,
            scopes=scopes,
            token=str(signed_token),
            platform=str(client.get("platform", "")),
            device_family=str(client.get("deviceFamily", "")),
        )
        if not ok:
            raise Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    "device signature invalid",
                    details={"code": "DEVICE_AUTH_SIGNATURE_INVALID"},
                )
            )
        if abs(now_ms() - int(device["signedAt"])) > SIGNATURE_SKEW_MS:
            raise Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    "device signature expired",
                    details={"code": "DEVICE_AUTH_SIGNATURE_EXPIRED"},
                )
            )

    def _pair(
        self, device_id: str, public_key: str, role: str, scopes: Iterable[str]
    ) -> Device:
        existing = self._devices.get(device_id)
        if existing is not None:
            if existing.role == role and set(scopes) <= set(existing.scopes):
                return existing
            if not existing.role and not self.pairing:
                existing.role = role  # loopback: silently re-approved
                self._device_tokens[existing.token] = existing
                return existing
            # An approved upgrade: the wider contract and a fresh token.
            self._device_tokens.pop(existing.token, None)
        record = Device(
            device_id=device_id,
            public_key=public_key,
            role=role,
            scopes=tuple(sorted(set(scopes))),
            token=secrets.token_urlsafe(32),
            issued_at=now_ms(),
        )
        self._devices[device_id] = record
        self._device_tokens[record.token] = record
        return record

    def _request_pairing(
        self,
        device: dict[str, Any],
        client: dict[str, Any],
        role: str,
        scopes: list[str],
        reason: str = "not-paired",
    ) -> str:
        device_id = str(device["id"])
        existing = self._pending_by_device.get(device_id)
        if existing is not None and self._pending[existing].get("reason") == reason:
            return existing  # a retry with the same details keeps its request id
        if existing is not None:
            self._pending.pop(existing, None)
        request_id = str(uuid.uuid4())
        req: dict[str, Any] = {
            "requestId": request_id,
            "deviceId": device_id,
            "publicKey": str(device["publicKey"]),
            "displayName": client.get("displayName"),
            "platform": client.get("platform"),
            "deviceFamily": client.get("deviceFamily"),
            "clientId": client.get("id"),
            "clientMode": client.get("mode"),
            "role": role,
            "roles": [role],
            "scopes": list(scopes),
            "silent": False,
            "isRepair": reason != "not-paired",
            "reason": reason,
            "ts": now_ms(),
        }
        self._pending[request_id] = req
        self._pending_by_device[device_id] = request_id
        self._broadcast_pairing("device.pair.requested", dict(req))
        if self.on_pairing_request is not None:
            self.on_pairing_request(dict(req))
        return request_id

    def _broadcast_pairing(self, event: str, payload: dict[str, Any]) -> None:
        targets = [c for c in self._conns.values() if c.has_scope(PAIRING)]
        self._broadcast(event, payload, targets=targets)

    def _hello(self, conn: Conn, record: Device | None) -> dict[str, Any]:
        v4 = self.protocol >= 4
        snapshot: dict[str, Any] = {
            "presence": self._presence_list(),
            "health": self._health_summary(),
            "stateVersion": dict(self._state_version),
            "uptimeMs": self._uptime_ms(),
            "sessionDefaults": {
                "defaultAgentId": self._default_agent,
                "mainKey": data.MAIN_KEY,
                "mainSessionKey": self.main_session_key,
                "scope": "per-sender",
            },
        }
        if v4:
            snapshot = {"suspension": {"phase": "accepting"}, **snapshot}
            snapshot["sessionDefaults"].update(
                modelConfigured=True, ownership="sole", selectionRequired=False
            )
            snapshot["updateSchedule"] = {"channel": "stable", "autoEnabled": False}
        if ADMIN in conn.scopes:
            snapshot.update(
                configPath=f"{data.STATE_DIR}/openclaw.json",
                stateDir=data.STATE_DIR,
                authMode="token",
            )
        policy: dict[str, Any] = {
            "maxPayload": MAX_PAYLOAD,
            "maxBufferedBytes": MAX_BUFFERED,
            "tickIntervalMs": self.tick_interval_ms,
        }
        hello: dict[str, Any] = {
            "type": "hello-ok",
            "protocol": self.protocol,
            "server": {"version": self.version, "connId": conn.conn_id},
            "features": {
                # Like the real gateway, sessions.usage* answer but are not listed.
                "methods": [
                    m for m in self._methods if not m.startswith("sessions.usage")
                ],
                "events": _V4_EVENTS if v4 else _V3_EVENTS,
            },
            "snapshot": snapshot,
        }
        if v4:
            hello["server"] = {
                "version": self.version,
                "buildId": self.build_id,
                "bootId": self.boot_id,
                "controlUiBuildSource": "bundled",
                "connId": conn.conn_id,
            }
            policy.update(
                attachments={"maxBytes": 19464192, "maxImageBytes": 6291456},
                allowedSessionVisibilities=["shared", "read-only", "suggest", "draft"],
            )
            auth: dict[str, Any] = {
                "method": "token" if conn.auth_method == "token" else "device-token",
                "role": conn.role,
                "scopes": list(conn.scopes),
            }
            if record is not None:
                auth.update(deviceToken=record.token, issuedAtMs=record.issued_at)
            hello["auth"] = auth
        else:
            hello["canvasHostUrl"] = f"{self.http_url}/__openclaw__/canvas/"
            if record is not None:
                hello["auth"] = {
                    "deviceToken": record.token,
                    "role": conn.role,
                    "scopes": list(conn.scopes),
                    "issuedAtMs": record.issued_at,
                }
        hello["policy"] = policy
        return hello


def _loopback_origin(origin: str) -> bool:
    try:
        host = urlsplit(origin).hostname or ""
    except ValueError:
        return False
    return host in ("127.0.0.1", "localhost", "::1")


def _device_token_mismatch() -> Refusal:
    """A device token that no paired device holds, or that belongs to another device."""
    return Refusal(
        RpcError(
            "INVALID_REQUEST",
            "unauthorized: device token mismatch (rotate/reissue device token)",
            details={
                "code": "AUTH_DEVICE_TOKEN_MISMATCH",
                "authReason": "device_token_mismatch",
                "canRetryWithDeviceToken": False,
                "recommendedNextStep": "update_auth_credentials",
            },
        )
    )
