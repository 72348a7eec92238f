from __future__ import annotations

import hashlib
import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from fleet.envrules import GatewayTls
from fleet.gateway import safe_url
from fleet.gateway.identity import b64url_decode

# What the gateway's PAIRING_REQUIRED `details.reason` means, in words for people.
PAIRING_REASONS = {
    "not-paired": "this Control Center's device is not paired with the gateway yet",
    "role-upgrade": "the device asks for a role it was not approved for",
    "scope-upgrade": "the device asks for more scopes than were approved "
    "(read, write and admin are needed)",
    "metadata-upgrade": "the device's details (name, platform) changed since it was "
    "approved, and the gateway wants them re-approved",
}


class Gateway(models.Model):
    """One OpenClaw gateway. Its token lives only in the worker's environment: we store the
    *name* of the environment variable that holds it, never the token."""

    class State(models.TextChoices):
        CONNECTING = "connecting", "Connecting"
        CONNECTED = "connected", "Connected"
        REST_FALLBACK = "rest_fallback", "REST fallback"
        PAIRING_REQUIRED = "pairing_required", "Pairing required"
        AUTH_FAILED = "auth_failed", "Authentication failed"
        TLS_FAILED = "tls_failed", "TLS verification failed"
        OFFLINE = "offline", "Offline"

    name = models.CharField(max_length=100, unique=True)
    url = models.CharField(
        max_length=500, help_text="ws://, wss://, http:// or https://"
    )
    rest_url = models.CharField(
        max_length=500,
        blank=True,
        default="",
        help_text="Blank: the gateway's own http(s) origin.",
    )
    token_env = models.CharField(
        max_length=100,
        default="OPENCLAW_GATEWAY_TOKEN",
        help_text="Name of the worker's environment variable that holds this gateway's token.",
    )
    enabled = models.BooleanField(default=True)

    # TLS for wss:// and https:// gateways. Blank: the system trust store, no pin.
    tls_ca_file = models.CharField(
        "CA bundle file",
        max_length=500,
        blank=True,
        default="",
        help_text="Path (on the worker) to a PEM bundle of the CA that signed the "
        "gateway's certificate, for a self-signed or private CA. Blank: the system trust store.",
    )
    tls_ca_env = models.CharField(
        "CA bundle environment variable",
        max_length=100,
        blank=True,
        default="",
        help_text="Or: the name of a worker environment variable holding that CA as PEM "
        "text (or a path to it).",
    )
    tls_pin = models.CharField(
        "TLS pin",
        max_length=200,
        blank=True,
        default="",
        help_text="Optional SHA-256 fingerprint of the gateway's certificate or of its "
        "public key (hex, colons allowed, or base64). A certificate that does not match is "
        "refused, even when the CA trusts it.",
    )
    # Set when an admin rotates the device identity: the worker reconnects with the new key.
    identity_rotated_at = models.DateTimeField(null=True, blank=True)

    state = models.CharField(max_length=20, choices=State, default=State.CONNECTING)
    last_error = models.TextField(blank=True, default="")
    state_changed_at = models.DateTimeField(default=timezone.now)
    # Since when the gateway has not been `connected`, through every state in between
    # (a reconnect loop flips connecting/offline, which moves state_changed_at each time);
    # None while connected. Alert rules ("offline for longer than N") read it.
    not_connected_since = models.DateTimeField(
        null=True, blank=True, default=timezone.now
    )
    protocol = models.PositiveSmallIntegerField(null=True, blank=True)
    server_version = models.CharField(max_length=100, blank=True, default="")
    connected_since = models.DateTimeField(null=True, blank=True)
    last_event_at = models.DateTimeField(null=True, blank=True)
    pairing_request_id = models.CharField(max_length=200, blank=True, default="")
    pairing_reason = models.CharField(max_length=50, blank=True, default="")
    main_session_key = models.CharField(max_length=200, blank=True, default="")
    health = models.JSONField(default=dict, blank=True)
    # Kept by the session writers in their own transaction (fleet/services/summary.py),
    # recounted on each full sync: the fleet page reads these instead of counting.
    live_sessions = models.PositiveIntegerField(default=0, editable=False)
    running_sessions = models.PositiveIntegerField(default=0, editable=False)
    # {"status": [...], "kind": [...], "channel": [...]}: the values its sessions carry.
    session_facets = models.JSONField(default=dict, blank=True, editable=False)

    # The worker lease: which worker process holds this gateway's connection, until when,
    # and the channel-layer name it takes commands on. Claimed with a conditional UPDATE.
    lease_owner = models.CharField(max_length=100, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    worker_channel = models.CharField(max_length=200, blank=True, default="")

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def badge_class(self) -> str:
        """The CSS class of the state's badge (app.css `.badge.ok/.warn/.bad`)."""
        return GATEWAY_STATE_BADGES.get(self.state, "bad")

    @property
    def approve_command(self) -> str:
        if not self.pairing_request_id:
            return ""
        return f"openclaw devices approve {self.pairing_request_id}"

    @property
    def pairing_reason_text(self) -> str:
        reason = self.pairing_reason or "not-paired"
        return PAIRING_REASONS.get(reason, f"the gateway asks for pairing ({reason})")

    @property
    def tls_settings(self) -> GatewayTls:
        return GatewayTls(
            ca_file=self.tls_ca_file, ca_env=self.tls_ca_env, pin=self.tls_pin
        )

    @property
    def safe_url(self) -> str:
        """The address without user:password or query string, for pages and messages."""
        return safe_url(self.url)

    @property
    def uses_tls(self) -> bool:
        return self.url.startswith(("wss://", "https://"))

    def worker_alive(self) -> bool:
        return bool(
            self.worker_channel
            and self.lease_expires_at
            and self.lease_expires_at > timezone.now()
        )


# The badge each gateway state wears: green when live, amber while it gets there or reads
# over REST, red for everything that needs a person.
GATEWAY_STATE_BADGES: dict[str, str] = {
    Gateway.State.CONNECTED: "ok",
    Gateway.State.CONNECTING: "warn",
    Gateway.State.REST_FALLBACK: "warn",
}


class DeviceIdentity(models.Model):
    """The Control Center's Ed25519 device identity towards one gateway, and the device
    token the gateway issued to it (kept so later connects can use it)."""

    gateway = models.OneToOneField(
        Gateway, on_delete=models.CASCADE, related_name="device"
    )
    private_key_pem = models.TextField()
    device_id = models.CharField(max_length=64)
    public_key = models.CharField(
        max_length=64, help_text="base64url of the raw 32-byte key"
    )
    device_token = models.TextField(blank=True, default="")
    device_token_scopes = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.device_id[:16]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the raw public key, first 16 bytes as colon hex (what DeviceKey shows)."""
        try:
            raw = b64url_decode(self.public_key)
        except ValueError:
            return ""
        digest = hashlib.sha256(raw).hexdigest()
        return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


class Agent(models.Model):
    gateway = models.ForeignKey(
        Gateway, on_delete=models.CASCADE, related_name="agents"
    )
    agent_id = models.CharField(max_length=200)
    name = models.CharField(max_length=200, blank=True, default="")
    emoji = models.CharField(max_length=32, blank=True, default="")
    identity = models.JSONField(default=dict, blank=True)
    model = models.CharField(max_length=200, blank=True, default="")
    is_default = models.BooleanField(default=False)
    raw = models.JSONField(default=dict, blank=True)
    gone_at = models.DateTimeField(null=True, blank=True)
    synced_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["gateway", "agent_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["gateway", "agent_id"], name="agent_unique_per_gateway"
            )
        ]

    def __str__(self) -> str:
        return self.agent_id

    @property
    def title(self) -> str:
        return self.name or self.agent_id


class Session(models.Model):
    gateway = models.ForeignKey(
        Gateway, on_delete=models.CASCADE, related_name="sessions"
    )
    key = models.CharField(max_length=512)
    agent = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="sessions"
    )
    agent_key = models.CharField(
        max_length=200,
        blank=True,
        default="",
        help_text="The agent id from the session key.",
    )
    session_id = models.CharField(max_length=200, blank=True, default="")
    label = models.CharField(max_length=500, blank=True, default="")
    display_name = models.CharField(max_length=500, blank=True, default="")
    kind = models.CharField(max_length=50, blank=True, default="")
    channel = models.CharField(max_length=100, blank=True, default="")
    model = models.CharField(max_length=200, blank=True, default="")
    model_provider = models.CharField(max_length=100, blank=True, default="")
    input_tokens = models.BigIntegerField(null=True, blank=True)
    output_tokens = models.BigIntegerField(null=True, blank=True)
    total_tokens = models.BigIntegerField(null=True, blank=True)
    context_tokens = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(max_length=50, blank=True, default="")
    has_active_run = models.BooleanField(default=False)
    updated_at = models.DateTimeField(
        null=True, blank=True, help_text="Last activity, as the gateway reports it."
    )
    gone_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the gateway stopped listing this session.",
    )
    deleted_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When an admin deleted it on the gateway from here.",
    )
    raw = models.JSONField(default=dict, blank=True)
    raw_hash = models.CharField(max_length=32, blank=True, default="")
    synced_at = models.DateTimeField(default=timezone.now)
    history_synced_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-updated_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["gateway", "key"], name="session_unique_per_gateway"
            )
        ]
        indexes = [
            # The fleet's session list: live sessions by last activity, all gateways or one.
            models.Index(
                fields=["-updated_at", "id"],
                name="session_live_recent",
                condition=Q(gone_at=None),
            ),
            # On PostgreSQL also session_live_order, the list's exact order (NULLS LAST,
            # then -id): made by migration 0008 only there (SQLite refuses NULLS LAST in
            # an index).
            models.Index(
                fields=["gateway", "-updated_at"], name="session_gateway_recent"
            ),
            # Filters of the session list and the admin.
            models.Index(fields=["agent", "-updated_at"], name="session_agent_recent"),
            models.Index(
                fields=["status", "-updated_at"], name="session_status_recent"
            ),
            models.Index(fields=["kind"], name="session_kind"),
            models.Index(fields=["channel"], name="session_channel"),
        ]

    def __str__(self) -> str:
        return self.key

    @property
    def title(self) -> str:
        return self.label or self.display_name or self.key

    @property
    def row_class(self) -> str:
        """The CSS class of its row in a list (fleet.css): a run beats gone."""
        if self.has_active_run:
            return "is-running"
        return "is-gone" if self.gone_at else ""

    @property
    def status_text(self) -> str:
        """The status a list shows: "gone" once the gateway stopped listing it."""
        return "gone" if self.gone_at else self.status or "idle"

    @property
    def context_use(self) -> float | None:
        """Share of the context window in use, 0..1, when both numbers are known."""
        if self.total_tokens is None or not self.context_tokens:
            return None
        return min(self.total_tokens / self.context_tokens, 1.0)

    @property
    def estimated_cost(self) -> float | None:
        """The gateway's `estimatedCostUsd` for this transcript (since its last reset)."""
        if "raw_cost" in self.__dict__:  # annotated by the list's query (fleet.queries)
            value = self.__dict__["raw_cost"]
        else:
            value = (
                self.raw.get("estimatedCostUsd") if isinstance(self.raw, dict) else None
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)


class PresenceEntry(models.Model):
    """A client or node connected to a gateway (`system-presence`, `presence` events)."""

    gateway = models.ForeignKey(
        Gateway, on_delete=models.CASCADE, related_name="presence"
    )
    instance_key = models.CharField(max_length=300)
    host = models.CharField(max_length=300, blank=True, default="")
    ip = models.CharField(max_length=100, blank=True, default="")
    mode = models.CharField(max_length=50, blank=True, default="")
    platform = models.CharField(max_length=100, blank=True, default="")
    version = models.CharField(max_length=100, blank=True, default="")
    device_family = models.CharField(max_length=100, blank=True, default="")
    roles = models.JSONField(default=list, blank=True)
    scopes = models.JSONField(default=list, blank=True)
    reason = models.CharField(max_length=100, blank=True, default="")
    text = models.TextField(blank=True, default="")
    last_input_seconds = models.IntegerField(null=True, blank=True)
    seen_at = models.DateTimeField(null=True, blank=True)
    raw = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["gateway", "host"]
        verbose_name = "presence entry"
        verbose_name_plural = "presence entries"
        constraints = [
            models.UniqueConstraint(
                fields=["gateway", "instance_key"], name="presence_unique_per_gateway"
            )
        ]

    def __str__(self) -> str:
        return self.host or self.instance_key

    @property
    def is_node(self) -> bool:
        return "node" in (self.roles or []) or self.mode == "node"


class AuditEvent(models.Model):
    """Every mutating action, from any path: who, what, where, with which parameters
    (secrets removed), and how it ended."""

    class Result(models.TextChoices):
        PENDING = "pending", "Pending"
        OK = "ok", "OK"
        ERROR = "error", "Error"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    username = models.CharField(max_length=150, blank=True, default="")
    action = models.CharField(max_length=100, db_index=True)
    gateway = models.ForeignKey(
        Gateway, null=True, blank=True, on_delete=models.SET_NULL
    )
    session = models.ForeignKey(
        Session, null=True, blank=True, on_delete=models.SET_NULL
    )
    session_key = models.CharField(max_length=512, blank=True, default="")
    params = models.JSONField(default=dict, blank=True)
    result = models.CharField(max_length=10, choices=Result, default=Result.PENDING)
    detail = models.TextField(blank=True, default="")
    ip = models.GenericIPAddressField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "-created_at"], name="audit_user_recent")
        ]

    def __str__(self) -> str:
        return f"{self.action} by {self.username or '-'}"

    def finish(self, ok: bool, detail: str = "") -> None:
        self.result = self.Result.OK if ok else self.Result.ERROR
        self.detail = detail
        self.save(update_fields=["result", "detail"])


def redact(params: Any) -> Any:
    """A copy of params with anything that looks like a secret replaced."""
    secret_words = ("token", "password", "secret", "key", "authorization")
    if isinstance(params, dict):
        return {
            k: "[removed]"
            if any(w in str(k).lower() for w in secret_words)
            and str(k) not in SAFE_KEYS
            else redact(v)
            for k, v in params.items()
        }
    if isinstance(params, list):
        return [redact(v) for v in params]
    return params


# Keys that contain a "secret word" but are identifiers, not secrets.
SAFE_KEYS = frozenset(
    {"sessionKey", "key", "idempotencyKey", "session_key", "token_env"}
)


class LoginThrottle(models.Model):
    """Failed logins of one account from one address (fleet/throttle.py). The row with an
    empty `account` is the address's own: every attempt from that address locks it first,
    so counting and checking happen one attempt at a time, across daphne processes."""

    account = models.CharField(max_length=150, blank=True)  # throttle.account_key()
    address = models.CharField(max_length=45, blank=True)  # "" when unknown
    failures = models.PositiveIntegerField(default=0)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    blocked_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["account", "address"], name="login_throttle_account_address"
            )
        ]
        # The per-address limit: the accounts this address failed on lately.
        indexes = [
            models.Index(
                fields=["address", "last_failure_at"], name="login_throttle_recent"
            )
        ]

    def __str__(self) -> str:
        return f"{self.account or '(address)'} from {self.address or '?'}"


class WorkerHeartbeat(models.Model):
    """One running gateway worker, as it last reported itself (fleet/leases.py). The live
    ones (seen within the lease time) share the gateways between them; a row whose worker
    died stays until another worker prunes it."""

    owner = models.CharField(
        max_length=100, unique=True
    )  # host:pid:nonce, as the lease
    started_at = models.DateTimeField(default=timezone.now)
    seen_at = models.DateTimeField(default=timezone.now)
    held = models.PositiveIntegerField(default=0)  # gateways it held at its last beat

    class Meta:
        ordering = ["started_at", "owner"]
        # live_workers() counts rows seen since a moment.
        indexes = [models.Index(fields=["seen_at"], name="fleet_worker_seen_idx")]

    def __str__(self) -> str:
        return self.owner

    def alive(self) -> bool:
        return (timezone.now() - self.seen_at).total_seconds() < float(
            settings.GATEWAY_LEASE_SECONDS
        )
