"""A Python client for the OpenClaw gateway (protocol 3 and 4): the WebSocket connection,
its HTTP side, the device identity, TLS with pinning and the frames. No Django, no
environment: the caller passes tokens, the CA bundle and its own name. See README.md.

The test kit (a fake gateway over real sockets) is `fleet.gateway.testing`.
"""

from __future__ import annotations

from fleet.gateway.client import (
    CLIENT_VERSION,
    MAX_FRAME_BYTES,
    BatchHandler,
    Closed,
    ConnectionLost,
    ConnectOptions,
    ConnectRefused,
    EventHandler,
    GatewayConnection,
    GatewayError,
    HelloOk,
    ws_url,
)
from fleet.gateway.guard import is_loopback, safe_url, url_refusal, url_shape_refusal
from fleet.gateway.identity import DeviceKey, verify_device_signature
from fleet.gateway.payloads import (
    AgentEvent,
    ChatEvent,
    ConnectChallenge,
    ErrorPayload,
    Health,
    HelloOkPayload,
    PresenceEntry,
    PresenceEvent,
    SessionMessage,
    SessionRow,
    SessionsChanged,
    SessionsListResult,
    TranscriptMessage,
)
from fleet.gateway.protocol import (
    CLOSE_AUTH_CHANGED,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SERVICE_RESTART,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    MAX_PROTOCOL,
    MIN_PROTOCOL,
    SCOPES,
    ErrorShape,
    Event,
    Frame,
    FrameError,
    Request,
    Response,
    chat_text,
    event_frame,
    parse_frame,
    request_frame,
    response_frame,
)
from fleet.gateway.rest import RestClient, RestError, rest_base_url
from fleet.gateway.tls import (
    PEM_MARKER,
    PinMismatch,
    PinnedSSLContext,
    TlsConfigError,
    TlsSettings,
    find_tls_failure,
    fingerprints,
    format_fingerprint,
    normalize_pin,
    tls_context,
    tls_failure_text,
)

__all__ = [
    # the connection
    "CLIENT_VERSION",
    "MAX_FRAME_BYTES",
    "BatchHandler",
    "Closed",
    "ConnectOptions",
    "EventHandler",
    "GatewayConnection",
    "HelloOk",
    "ws_url",
    # the HTTP side
    "RestClient",
    "rest_base_url",
    # the device identity
    "DeviceKey",
    "verify_device_signature",
    # TLS
    "PEM_MARKER",
    "PinnedSSLContext",
    "TlsSettings",
    "find_tls_failure",
    "fingerprints",
    "format_fingerprint",
    "normalize_pin",
    "tls_context",
    "tls_failure_text",
    # where a token may go
    "is_loopback",
    "safe_url",
    "url_refusal",
    "url_shape_refusal",
    # errors
    "ConnectRefused",
    "ConnectionLost",
    "FrameError",
    "GatewayError",
    "PinMismatch",
    "RestError",
    "TlsConfigError",
    # frames
    "CLOSE_AUTH_CHANGED",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_SERVICE_RESTART",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_AGAIN_LATER",
    "MAX_PROTOCOL",
    "MIN_PROTOCOL",
    "SCOPES",
    "ErrorShape",
    "Event",
    "Frame",
    "Request",
    "Response",
    "chat_text",
    "event_frame",
    "parse_frame",
    "request_frame",
    "response_frame",
    # typed payloads
    "AgentEvent",
    "ChatEvent",
    "ConnectChallenge",
    "ErrorPayload",
    "Health",
    "HelloOkPayload",
    "PresenceEntry",
    "PresenceEvent",
    "SessionMessage",
    "SessionRow",
    "SessionsChanged",
    "SessionsListResult",
    "TranscriptMessage",
]
