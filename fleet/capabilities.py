"""What each capability plugs into the gateway worker, registered from its own app.

The worker knows the connection, the lease, the sync and the REST fallback; everything a
gateway event *means* belongs to a capability (chat transcripts, exec approvals, usage,
cron, alerts), which says so once, from its ``AppConfig.ready``::

    from fleet import capabilities, roles

    capabilities.register(
        capabilities.Capability(
            name="approvals",
            events={"exec.approval.requested": on_requested},
            calls={"exec.approval.resolve": roles.OPERATOR},
            connect_caps=("approvals",),
            connect_scopes=("operator.approvals",),
            on_ready=read_pending,
        )
    )

The worker then routes events by this table (no central ``if/elif``), asks the gateway for
the union of the caps and scopes, lets the web call exactly the methods listed (each with
the least role that may ask, checked by the web and again by the worker), and runs the
periodic steps. Nothing here imports the worker, so a capability never imports it either:
the direction is capability → fleet, never back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class GatewayLink(Protocol):
    """What a capability's handler may use of the runner that holds one gateway."""

    gateway_id: int
    name: str
    protocol: int | None

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Call the gateway on the live connection (raises when it is not connected)."""
        ...


EventHandler = Callable[[GatewayLink, Any], Awaitable[None]]
LinkHandler = Callable[[GatewayLink], Awaitable[None]]
# An outcome recorder: after the worker made a call for the web, it records what came of it
# (the message's state, the audit event's result) once, whether or not a page is watching.
OutcomeHandler = Callable[
    [GatewayLink | None, dict[str, Any], dict[str, Any]], Awaitable[None]
]
# A per-call check that depends on the params (sync; raises PermissionError with words for
# people): e.g. "allow-always needs an admin". Run by the web and again by the worker.
Authorizer = Callable[[Any, dict[str, Any]], None]
PeriodicStep = Callable[
    [], Any
]  # sync; run through the worker's retrying database helper


@dataclass(frozen=True)
class Periodic:
    seconds: float
    step: PeriodicStep
    name: str = ""


@dataclass(frozen=True)
class Capability:
    name: str
    # gateway event name -> handler; an event may have several handlers (one per capability)
    events: Mapping[str, EventHandler] = field(default_factory=dict)
    # gateway method the web may ask for -> the least role (fleet.roles) that may ask
    calls: Mapping[str, str] = field(default_factory=dict)
    # gateway method -> what records the outcome of a web call of it (see OutcomeHandler)
    outcomes: Mapping[str, OutcomeHandler] = field(default_factory=dict)
    # gateway method -> a check of (user, params) beyond the role (see Authorizer)
    authorize: Mapping[str, Authorizer] = field(default_factory=dict)
    connect_caps: tuple[str, ...] = ()
    connect_scopes: tuple[str, ...] = ()
    on_ready: LinkHandler | None = None  # after each hello-ok and its sync
    on_lost: LinkHandler | None = None  # when the connection ends
    periodic: tuple[Periodic, ...] = ()


_registry: dict[str, Capability] = {}


def register(capability: Capability) -> None:
    """Add (or replace, by name: ``ready()`` may run twice in tests) a capability."""
    _registry[capability.name] = capability


def all_capabilities() -> list[Capability]:
    return list(_registry.values())


def event_handlers(event: str) -> list[EventHandler]:
    return [c.events[event] for c in _registry.values() if event in c.events]


def method_roles() -> dict[str, str]:
    roles: dict[str, str] = {}
    for capability in _registry.values():
        roles.update(capability.calls)
    return roles


def outcome_handler(method: str) -> OutcomeHandler | None:
    for capability in _registry.values():
        if method in capability.outcomes:
            return capability.outcomes[method]
    return None


def authorizers(method: str) -> list[Authorizer]:
    return [c.authorize[method] for c in _registry.values() if method in c.authorize]


def connect_caps() -> list[str]:
    return sorted({cap for c in _registry.values() for cap in c.connect_caps})


def connect_scopes() -> list[str]:
    return sorted({s for c in _registry.values() for s in c.connect_scopes})
