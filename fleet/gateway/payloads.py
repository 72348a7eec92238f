"""The shapes of the payloads a client reads, as TypedDicts (protocol 3 and 4).

These describe what the gateway sends (checked against recorded frames of the real gateway
and the test kit's frames); they do not validate. Every key is optional (`total=False`):
the gateway omits what does not apply, older gateways send less, and newer ones add keys
not named here. Read them with `.get()` and check the type of what you use, as
`HelloOk.parse` and `ErrorShape.parse` do for the two this library parses itself.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

# -- the handshake ---------------------------------------------------------------------------


class ConnectChallenge(TypedDict, total=False):
    """`connect.challenge`: the nonce the device signature covers."""

    nonce: str
    ts: int
    capabilities: list[Any]


class HelloServer(TypedDict, total=False):
    version: str
    connId: str
    buildId: str


class HelloPolicy(TypedDict, total=False):
    tickIntervalMs: int
    maxPayload: int
    maxBufferedBytes: int


class HelloFeatures(TypedDict, total=False):
    methods: list[str]
    events: list[str]


class HelloAuth(TypedDict, total=False):
    deviceToken: str
    role: str
    scopes: list[str]
    issuedAtMs: int


class SessionDefaults(TypedDict, total=False):
    mainSessionKey: str
    defaultAgentId: str


class HelloSnapshot(TypedDict, total=False):
    presence: list[PresenceEntry]
    health: Health
    sessionDefaults: SessionDefaults
    uptimeMs: int
    stateVersion: dict[str, int]


class HelloOkPayload(TypedDict, total=False):
    """The answer to `connect` (parsed into `HelloOk`)."""

    type: Literal["hello-ok"]
    protocol: int
    server: HelloServer
    features: HelloFeatures
    snapshot: HelloSnapshot
    auth: HelloAuth
    policy: HelloPolicy


class ErrorPayload(TypedDict, total=False):
    """A refused call's `error` (parsed into `ErrorShape`)."""

    code: str
    message: str
    retryable: bool
    retryAfterMs: int
    details: dict[str, Any]


# -- sessions --------------------------------------------------------------------------------


class SessionRow(TypedDict, total=False):
    """One row of `sessions.list` (and the `session` of the session events)."""

    key: str
    sessionId: str
    agentId: str
    kind: str
    classification: str
    label: str | None
    displayName: str
    derivedTitle: str
    subject: str
    channel: str
    lastChannel: str
    chatType: str
    origin: dict[str, Any]
    deliveryContext: dict[str, Any]
    model: str
    modelProvider: str
    inputTokens: int
    outputTokens: int
    totalTokens: int
    contextTokens: int
    status: str
    hasActiveRun: bool
    isMain: bool
    createdAt: int
    updatedAt: int
    lastActivityAt: int


class SessionsListResult(TypedDict, total=False):
    """The answer to `sessions.list`."""

    sessions: list[SessionRow]
    count: int
    totalCount: int
    hasMore: bool
    nextOffset: int | None
    ts: int


class SessionsChanged(TypedDict, total=False):
    """`sessions.changed`: the row (`session`) and, flattened beside it, its fields; or a
    bare `reason: "delete"`. Without a key it asks for a full resync."""

    sessionKey: str
    sessionId: str
    agentId: str
    reason: str
    phase: str
    runId: str
    ts: int
    session: SessionRow
    updatedAt: int
    displayName: str
    label: str | None


# -- messages and runs -----------------------------------------------------------------------


class MessageMeta(TypedDict, total=False):
    id: str
    seq: int
    runId: str
    idempotencyKey: str


class ContentBlock(TypedDict, total=False):
    type: str
    text: str


# `__openclaw` cannot be a class attribute (Python mangles the name): the functional form.
TranscriptMessage = TypedDict(
    "TranscriptMessage",
    {
        "role": str,
        "content": str | list[ContentBlock],
        "text": str,
        "timestamp": int,
        "model": str,
        "provider": str,
        "usage": Any,
        "idempotencyKey": str,
        "__openclaw": MessageMeta,
    },
    total=False,
)


class SessionMessage(TypedDict, total=False):
    """`session.message`: one transcript entry, with the session's row."""

    sessionKey: str
    sessionId: str
    agentId: str
    message: TranscriptMessage
    messageId: str
    messageSeq: int
    session: SessionRow


class ChatEvent(TypedDict, total=False):
    """`chat`: a run's reply as it grows (`delta`) and ends (`final`, `aborted`, `error`)."""

    runId: str
    sessionKey: str
    agentId: str
    seq: int
    state: str
    deltaText: str
    message: TranscriptMessage
    errorMessage: str
    stopReason: str
    usage: dict[str, Any]


class AgentEvent(TypedDict, total=False):
    """`agent` (and `session.tool`): one step of a run on a `stream` (`lifecycle`,
    `assistant`, `tool`, ...) with its `data`."""

    runId: str
    sessionKey: str
    sessionId: str
    agentId: str
    stream: str
    data: dict[str, Any]
    seq: int
    ts: int
    isHeartbeat: bool


# -- the gateway itself ----------------------------------------------------------------------


class PresenceEntry(TypedDict, total=False):
    """One client or node the gateway sees (`system-presence`, `presence`)."""

    instanceId: str
    deviceId: str
    host: str
    ip: str
    mode: str
    platform: str
    version: str
    deviceFamily: str
    roles: list[str]
    scopes: list[str]
    reason: str
    text: str
    lastInputSeconds: int
    ts: int


class PresenceEvent(TypedDict, total=False):
    presence: list[PresenceEntry]


class Health(TypedDict, total=False):
    """`health` (the call and the event)."""

    ok: bool
    ts: int
    durationMs: int
    heartbeatSeconds: int
    defaultAgentId: str
    agents: list[dict[str, Any]]
    sessions: dict[str, Any]
    channels: dict[str, Any]
