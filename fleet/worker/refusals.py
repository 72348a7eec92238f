"""What a refused connect or a closed connection means: the state a gateway shows, the
words, and when to try again.

Decisions only: nothing here reads the database, the network or the channel layer (the
`worker-refusals-decide` contract in pyproject.toml), so the mapping is tested by calling it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from fleet import envrules
from fleet.envrules import GatewayTls
from fleet.gateway import (
    CLOSE_AUTH_CHANGED,
    CLOSE_SERVICE_RESTART,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    MAX_FRAME_BYTES,
    Closed,
    ConnectRefused,
    ErrorShape,
)
from fleet.models import PAIRING_REASONS, Gateway

State = Gateway.State

AUTH_RETRY_SECONDS = 60.0
# While a pairing request waits for a person: a steady, slow retry (no backoff growth), so
# the worker connects within seconds of the approval without hammering the gateway.
PAIRING_RETRY_SECONDS = 10.0
PROTOCOL_RETRY_SECONDS = 60.0
# A refused certificate (untrusted, or not the pinned one) needs a person too.
TLS_RETRY_SECONDS = 60.0
# Close 4001 with this reason: the gateway's shared secret changed. Any other 4001 reason
# ("device removed", "client invalidated: device-token-revoked", ...) is about our device.
AUTH_CHANGED_REASON = "gateway auth changed"


class Backoff:
    """1 s doubling to 30 s, each delay drawn between half and all of it (jitter)."""

    def __init__(self, first: float = 1.0, cap: float = 30.0) -> None:
        self.first, self.cap, self.attempts = first, cap, 0

    def next(self) -> float:
        base = min(self.cap, self.first * 2**self.attempts)
        self.attempts += 1
        return random.uniform(base / 2, base)

    def reset(self) -> None:
        self.attempts = 0


@dataclass(frozen=True)
class Outcome:
    """What a refused connect means: the state to show, the words, when to try again."""

    state: str
    message: str
    delay: float | None  # None: the usual backoff
    fields: dict[str, Any]
    drop_device_token: bool = False
    # The gateway refused the shared token but offers a retry with our device token.
    retry_with_device_token: bool = False


def settings_refusal(
    url: str, rest_url: str, token_env: str, tls: GatewayTls
) -> tuple[str, str]:
    """(state, why) when a gateway's settings may not be used at all (a variable the
    deployment does not allow, a token that would go out in clear or to an address with
    credentials in it); ("", "") when they may. The admin form refuses the same; this
    is for a row written around it."""
    if token_env and (why := envrules.env_name_refusal(token_env, envrules.TOKEN)):
        return State.AUTH_FAILED, why
    if tls.ca_env and (
        why := envrules.env_name_refusal(tls.ca_env, envrules.CA_BUNDLE)
    ):
        return State.TLS_FAILED, f"TLS settings: {why}"
    why = envrules.url_refusal(url) or (
        envrules.url_refusal(rest_url, "The REST fallback address") if rest_url else ""
    )
    return (State.OFFLINE, why) if why else ("", "")


def shared_token_refused(token_env: str) -> Outcome:
    """The shared token was refused and no device token is left to try."""
    return Outcome(
        State.AUTH_FAILED,
        f"The gateway refused the shared token in {token_env} (token "
        "mismatch) and this Control Center holds no device token it accepts. "
        f"If the gateway's shared secret changed, put the new token in "
        f"{token_env} and restart the worker.",
        AUTH_RETRY_SECONDS,
        {},
    )


def device_token_note(token_env: str) -> str:
    """Shown on the card while the worker is connected on its device token."""
    return (
        f"Connected with this Control Center's device token: the gateway "
        f"refused the shared token in {token_env} (its shared secret "
        f"changed?). Put the new token in {token_env} and restart the "
        "worker; the REST fallback and a new pairing need it."
    )


def refusal_outcome(exc: ConnectRefused, token_env: str) -> Outcome:
    error: ErrorShape | None = exc.error
    code = error.detail_code if error else ""
    if error is not None and (error.code == "NOT_PAIRED" or code == "PAIRING_REQUIRED"):
        request_id = str(error.details.get("requestId") or "")
        reason = str(error.details.get("reason") or "not-paired")
        words = PAIRING_REASONS.get(reason, f"the gateway asks for pairing ({reason})")
        if request_id:
            message = (
                f"Pairing required: {words}. On the gateway host, run: "
                f"openclaw devices approve {request_id} "
                "(the Control Center connects by itself once it is approved)."
            )
        else:
            message = (
                f"Pairing required: {words} ({error.message}). On the gateway host, run "
                "openclaw devices list, then openclaw devices approve <requestId>."
            )
        return Outcome(
            State.PAIRING_REQUIRED,
            message,
            PAIRING_RETRY_SECONDS,
            {"pairing_request_id": request_id[:200], "pairing_reason": reason[:50]},
        )
    if code == "AUTH_DEVICE_TOKEN_MISMATCH":
        return Outcome(
            State.CONNECTING,
            "The gateway no longer accepts this Control Center's device token (revoked or "
            f"rotated on the gateway); trying the shared token from {token_env}.",
            1.0,
            {},
            drop_device_token=True,
        )
    if (
        code == "AUTH_TOKEN_MISMATCH"
        and error is not None
        and error.details.get("canRetryWithDeviceToken") is True
    ):
        return Outcome(
            State.CONNECTING,
            f"The gateway refused the shared token in {token_env} (token mismatch: its shared "
            "secret may have changed); retrying with this Control Center's device token.",
            1.0,
            {},
            retry_with_device_token=True,
        )
    if code == "AUTH_TOKEN_MISSING":
        return Outcome(
            State.AUTH_FAILED,
            f"The gateway wants a token and none was sent: set {token_env} in the worker's environment.",
            AUTH_RETRY_SECONDS,
            {},
        )
    if (
        code == "AUTH_TOKEN_MISMATCH"
        or code.startswith("AUTH_")
        or code.startswith("DEVICE_")
    ):
        what = (
            "token mismatch"
            if code == "AUTH_TOKEN_MISMATCH"
            else code.lower().replace("_", " ")
        )
        return Outcome(
            State.AUTH_FAILED,
            f"The gateway refused our credentials ({what}). Check {token_env} in the worker's environment.",
            float(error.retry_after_ms) / 1000
            if error and error.retry_after_ms
            else AUTH_RETRY_SECONDS,
            {},
        )
    if code == "PROTOCOL_MISMATCH" or (error is None and exc.close_code == 1002):
        expected = error.details.get("expectedProtocol") if error else None
        return Outcome(
            State.OFFLINE,
            f"Protocol mismatch: the gateway speaks protocol {expected or 'another version'}, "
            "the Control Center speaks 3 to 4.",
            PROTOCOL_RETRY_SECONDS,
            {},
        )
    if (
        error is not None and error.retryable
    ) or exc.close_code == CLOSE_TRY_AGAIN_LATER:
        delay = error.retry_after_ms / 1000 if error and error.retry_after_ms else 1.0
        return Outcome(
            State.CONNECTING, f"The gateway is starting: {exc}", max(delay, 0.1), {}
        )
    return Outcome(
        State.OFFLINE, f"The gateway refused the connection: {exc}", None, {}
    )


@dataclass(frozen=True)
class CloseOutcome:
    """What the end of a connection means: the gateway shows `connecting` with these
    words, and the runner tries again after `delay` (None: the usual backoff)."""

    message: str
    delay: float | None
    # The words stay as the last WebSocket error (shown while the REST fallback polls).
    remember: bool = True
    log_level: int | None = logging.WARNING
    drop_device_token: bool = False


def close_outcome(closed: Closed, token_env: str) -> CloseOutcome:
    if closed.code == CLOSE_SERVICE_RESTART or closed.shutdown is not None:
        expected = (closed.shutdown or {}).get("restartExpectedMs")
        return CloseOutcome(
            "The gateway is restarting.",
            min(max(float(expected) / 1000, 0.5), 30)
            if isinstance(expected, int | float)
            else 1.0,
            log_level=None,
        )
    if closed.code == CLOSE_TRY_AGAIN_LATER:
        return CloseOutcome(
            "The gateway asked us to try again shortly.",
            1.0,
            remember=False,
            log_level=None,
        )
    if closed.code == CLOSE_AUTH_CHANGED:
        if closed.reason.strip().lower() == AUTH_CHANGED_REASON:
            # The shared secret changed: try again with what the environment holds now;
            # if the gateway refuses it, the device token is tried next, and a refusal of
            # both shows as auth_failed saying what to do.
            return CloseOutcome(
                "The gateway's shared secret changed (close 4001): reconnecting. If "
                f"{token_env} still holds the old token, put the new one there "
                "and restart the worker.",
                1.0,
                log_level=logging.INFO,
            )
        # Our device token was revoked or rotated, or the device removed: forget the token
        # and come back with the shared one (the gateway may ask for pairing again; the
        # card then shows the approve command).
        return CloseOutcome(
            f"The gateway ended this Control Center's device session (close 4001: "
            f"{closed.reason or 'no reason'}): its device token was revoked or "
            f"rotated, or the device removed. Reconnecting with the shared token "
            f"from {token_env}; approve a new pairing request if one appears.",
            1.0,
            log_level=logging.INFO,
            drop_device_token=True,
        )
    if closed.code == CLOSE_TOO_BIG:
        return CloseOutcome(
            f"The gateway sent a frame over the {MAX_FRAME_BYTES // 2**20} MiB limit, "
            "so the connection was closed (code 1009); reconnecting.",
            None,
        )
    return CloseOutcome(
        f"The connection closed (code {closed.code}{': ' + closed.reason if closed.reason else ''}).",
        None,
    )
