"""The persist/reconcile core, called directly as plain sync functions."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fleet import services
from fleet.models import Agent, Gateway, PresenceEntry, Session


def row(key: str, **fields: Any) -> dict[str, Any]:
    return {
        "key": key,
        "kind": "direct",
        "updatedAt": 1_795_000_000_000,
        "status": "done",
        **fields,
    }


@pytest.fixture
def gateway(db: Any) -> Gateway:
    return Gateway.objects.create(name="gw", url="ws://127.0.0.1:1")


def test_it_creates_updates_and_marks_gone(gateway: Gateway) -> None:
    first = services.reconcile_sessions(
        gateway.pk, [row("agent:main:a"), row("agent:main:b")]
    )
    assert len(first.created) == 2
    second = services.reconcile_sessions(
        gateway.pk, [row("agent:main:a", label="renamed"), row("agent:main:c")]
    )
    assert (
        len(second.created) == 1 and len(second.updated) == 1 and len(second.gone) == 1
    )
    b = Session.objects.get(key="agent:main:b")
    assert b.gone_at is not None  # kept, not deleted
    assert Session.objects.get(key="agent:main:a").label == "renamed"


def test_it_writes_nothing_when_nothing_changed(gateway: Gateway) -> None:
    rows = [row(f"agent:main:s{i}", totalTokens=i) for i in range(50)]
    services.reconcile_sessions(gateway.pk, rows)
    with CaptureQueriesContext(connection) as queries:
        result = services.reconcile_sessions(gateway.pk, rows)
    assert result.rows_written == 0
    writes = [
        q
        for q in queries.captured_queries
        if q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE"))
    ]
    assert writes == []


def test_it_brings_back_a_gone_session(gateway: Gateway) -> None:
    services.reconcile_sessions(gateway.pk, [row("agent:main:a")])
    services.reconcile_sessions(gateway.pk, [])
    assert Session.objects.get().gone_at is not None
    services.reconcile_sessions(gateway.pk, [row("agent:main:a")])
    assert Session.objects.get().gone_at is None


def test_it_maps_v4_row_fields(gateway: Gateway) -> None:
    services.reconcile_agents(
        gateway.pk,
        {
            "defaultId": "main",
            "agents": [{"id": "main", "model": {"primary": "fake/fake-model"}}],
        },
    )
    services.reconcile_sessions(
        gateway.pk,
        [
            row(
                "agent:main:main",
                displayName="webchat:g-main",
                inputTokens=10,
                outputTokens=18,
                totalTokens=28,
                contextTokens=128000,
                model="fake-model",
                modelProvider="fake",
                hasActiveRun=True,
                status="running",
                origin={"provider": "webchat"},
            )
        ],
    )
    s = Session.objects.select_related("agent").get()
    assert s.agent is not None and s.agent.agent_id == "main" and s.agent.is_default
    assert (s.input_tokens, s.output_tokens, s.total_tokens, s.context_tokens) == (
        10,
        18,
        28,
        128000,
    )
    assert s.has_active_run and s.status == "running" and s.channel == "webchat"
    assert s.title == "webchat:g-main"
    assert s.updated_at is not None and s.updated_at.year == 2026


def test_it_links_sessions_that_arrived_before_their_agent(gateway: Gateway) -> None:
    services.reconcile_sessions(gateway.pk, [row("agent:ops:x")])
    assert Session.objects.get().agent is None
    services.reconcile_agents(
        gateway.pk,
        {
            "defaultId": "main",
            "agents": [
                {"id": "main"},
                {"id": "ops", "identity": {"name": "Ops", "emoji": "🛠"}},
            ],
        },
    )
    s = Session.objects.select_related("agent").get()
    assert s.agent is not None and s.agent.name == "Ops" and s.agent.emoji == "🛠"


def test_it_marks_agents_gone_and_merges_rest_rows(gateway: Gateway) -> None:
    services.reconcile_agents(
        gateway.pk,
        {
            "defaultId": "main",
            "agents": [{"id": "main", "model": {"primary": "m1"}}, {"id": "b"}],
        },
    )
    # The REST `agents_list` rows carry less: merged, they must not wipe what we know.
    services.reconcile_agents(
        gateway.pk,
        {"requester": "main", "agents": [{"id": "main", "configured": False}]},
        merge=True,
    )
    main = Agent.objects.get(agent_id="main")
    assert main.model == "m1" and main.gone_at is None
    assert Agent.objects.get(agent_id="b").gone_at is not None


def test_it_applies_sessions_changed_with_row_flattened_and_rowless(
    gateway: Gateway,
) -> None:
    change = services.apply_session_changed(
        gateway.pk,
        {
            "sessionKey": "agent:main:a",
            "reason": "create",
            "session": row("agent:main:a", label="L"),
        },
    )
    assert change.session_id == Session.objects.get().pk
    # The same row again changes nothing, so nothing needs pushing.
    again = services.apply_session_changed(
        gateway.pk,
        {"sessionKey": "agent:main:a", "session": row("agent:main:a", label="L")},
    )
    assert again.session_id is None and not again.resync
    # Protocol 3 sends flattened fields without `session`: merged into what we have.
    services.apply_session_changed(
        gateway.pk,
        {
            "sessionKey": "agent:main:a",
            "reason": "patch",
            "phase": "start",
            "totalTokens": 99,
            "ts": 1,
        },
    )
    s = Session.objects.get()
    assert s.total_tokens == 99 and s.label == "L"
    assert "phase" not in s.raw
    assert services.apply_session_changed(
        gateway.pk, {"reason": "delete", "ts": 1}
    ).resync
    gone = services.apply_session_changed(
        gateway.pk, {"sessionKey": "agent:main:a", "reason": "delete"}
    )
    assert gone.session_id == s.pk and Session.objects.get().gone_at is not None


def test_it_replaces_presence(gateway: Gateway) -> None:
    services.replace_presence(
        gateway.pk,
        [
            {"host": "cli", "mode": "cli", "instanceId": "i1", "ts": 1},
            {"host": "node-a", "mode": "node", "roles": ["node"], "deviceId": "d1"},
        ],
    )
    assert PresenceEntry.objects.count() == 2
    assert services.replace_presence(
        gateway.pk,
        {"presence": [{"host": "cli", "mode": "cli", "instanceId": "i1", "ts": 1}]},
    )
    assert list(PresenceEntry.objects.values_list("instance_key", flat=True)) == ["i1"]
    assert not services.replace_presence(
        gateway.pk, [{"host": "cli", "mode": "cli", "instanceId": "i1", "ts": 1}]
    )
    # Only the clock moved (the gateway's own entry carries the time of each call).
    with CaptureQueriesContext(connection) as queries:
        assert not services.replace_presence(
            gateway.pk,
            [
                {
                    "host": "cli",
                    "mode": "cli",
                    "instanceId": "i1",
                    "ts": 9,
                    "lastInputSeconds": 4,
                }
            ],
        )
    assert not [
        q for q in queries if q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE"))
    ]
    assert services.replace_presence(
        gateway.pk,
        [{"host": "cli", "mode": "cli", "instanceId": "i1", "ts": 9, "version": "2"}],
    )
    assert PresenceEntry.objects.get().version == "2"


def test_it_claims_a_gateway_for_one_worker_only(gateway: Gateway) -> None:
    assert services.claim_gateway(gateway.pk, "w1", "chan-1")
    assert not services.claim_gateway(gateway.pk, "w2", "chan-2")
    assert services.claim_gateway(gateway.pk, "w1", "chan-1")  # renewal
    Gateway.objects.filter(pk=gateway.pk).update(lease_expires_at=None)
    assert services.claim_gateway(gateway.pk, "w2", "chan-2")  # expired: taken over
    services.release_gateway(gateway.pk, "w1", "stopped")  # not the owner: no effect
    assert Gateway.objects.get().lease_owner == "w2"


def test_it_keeps_a_stable_device_identity(gateway: Gateway) -> None:
    key, token = services.device_key_for(gateway.pk)
    again, _ = services.device_key_for(gateway.pk)
    assert key.device_id == again.device_id and token == ""
    services.store_device_token(gateway.pk, "dt", ["operator.read"])
    assert services.device_key_for(gateway.pk)[1] == "dt"


def test_it_sets_state_and_reports_changes(gateway: Gateway) -> None:
    assert services.set_state(
        gateway.pk, Gateway.State.PAIRING_REQUIRED, "approve", pairing_request_id="r1"
    )
    assert not services.set_state(
        gateway.pk, Gateway.State.PAIRING_REQUIRED, "approve", pairing_request_id="r1"
    )
    assert Gateway.objects.get().approve_command == "openclaw devices approve r1"
    services.set_state(gateway.pk, Gateway.State.OFFLINE, "down")
    assert Gateway.objects.get().pairing_request_id == ""


def test_a_run_of_sessions_changed_ends_as_if_applied_one_by_one(
    gateway: Gateway,
) -> None:
    services.reconcile_sessions(gateway.pk, [row("agent:main:a"), row("agent:main:b")])
    a, b = (Session.objects.get(key=k).pk for k in ("agent:main:a", "agent:main:b"))

    def full(key: str, **fields: Any) -> dict[str, Any]:
        return {"sessionKey": key, "reason": "update", "session": row(key, **fields)}

    batch = services.apply_sessions_changed(
        gateway.pk,
        [
            full("agent:main:a", label="a1"),
            full("agent:main:b", label="b1"),
            full("agent:main:a", label="a2"),  # the last full row wins
            {"sessionKey": "agent:main:a", "totalTokens": 7},  # laid over a2
            {"sessionKey": "agent:main:b", "reason": "delete"},
            full("agent:main:c", label="c1"),  # new
            {"reason": "delete"},  # rowless: stop here, the caller resyncs
            full("agent:main:a", label="never"),
        ],
    )
    c = Session.objects.get(key="agent:main:c").pk
    assert batch.consumed == 7 and batch.resync
    assert sorted(batch.session_ids) == sorted({a, b, c})
    first = Session.objects.get(pk=a)
    assert (first.label, first.total_tokens) == ("a2", 7)
    assert Session.objects.get(pk=b).gone_at is not None
    # The same rows again: nothing written, nothing to push.
    again = services.apply_sessions_changed(
        gateway.pk, [full("agent:main:c", label="c1")]
    )
    assert again.session_ids == [] and again.consumed == 1 and not again.resync


# -- the per-gateway summary on the gateway row (fleet/services/summary.py) --------------------


def _summary(gateway: Gateway) -> tuple[int, int, dict[str, Any]]:
    gateway.refresh_from_db()
    return gateway.live_sessions, gateway.running_sessions, gateway.session_facets


def test_the_summary_follows_sync_events_and_deletes(gateway: Gateway) -> None:
    other = Gateway.objects.create(name="other", url="ws://127.0.0.1:2")
    services.reconcile_sessions(other.pk, [row("agent:main:x", channel="slack")])
    services.reconcile_sessions(
        gateway.pk,
        [
            row("agent:main:a", channel="webchat"),
            row("agent:main:b", hasActiveRun=True, status="running"),
            row("agent:main:c", kind="group"),
        ],
    )
    assert _summary(gateway) == (
        3,
        1,
        {
            "status": ["done", "running"],
            "kind": ["direct", "group"],
            "channel": ["webchat"],
        },
    )
    # events: an upsert with a new channel, a run ending, a delete
    services.apply_sessions_changed(
        gateway.pk,
        [
            {
                "sessionKey": "agent:main:d",
                "session": row("agent:main:d", channel="telegram"),
            },
            {"sessionKey": "agent:main:b", "hasActiveRun": False, "status": "done"},
            {"sessionKey": "agent:main:a", "reason": "delete"},
        ],
    )
    live, running, facets = _summary(gateway)
    assert (live, running) == (3, 0)
    assert facets["channel"] == ["telegram", "webchat"]
    # a full sync recounts from scratch (gone rows keep their values in the filter)
    services.reconcile_sessions(gateway.pk, [row("agent:main:d")])
    assert _summary(gateway)[:2] == (1, 0)
    # the other gateway was never touched, and deleting this one leaves it as it was
    gateway.delete()
    assert _summary(other) == (
        1,
        0,
        {"status": ["done"], "kind": ["direct"], "channel": ["slack"]},
    )


def test_a_full_sync_repairs_a_drifted_summary(gateway: Gateway) -> None:
    rows = [row(f"agent:main:s{i}", hasActiveRun=i < 2) for i in range(5)]
    services.reconcile_sessions(gateway.pk, rows)
    assert _summary(gateway)[:2] == (5, 2)
    Gateway.objects.filter(pk=gateway.pk).update(
        live_sessions=40, running_sessions=9, session_facets={"kind": ["bogus"]}
    )
    services.reconcile_sessions(gateway.pk, rows)  # nothing changed on the gateway
    assert _summary(gateway) == (
        5,
        2,
        {"status": ["done"], "kind": ["direct"], "channel": []},
    )


def test_the_filter_choices_come_from_the_gateway_rows(gateway: Gateway) -> None:
    from fleet import queries

    other = Gateway.objects.create(name="other", url="ws://127.0.0.1:2")
    services.reconcile_sessions(gateway.pk, [row("agent:main:a", channel="webchat")])
    services.reconcile_sessions(
        other.pk, [row("agent:main:b", kind="group", channel="slack")]
    )
    with CaptureQueriesContext(connection) as captured:
        choices = queries.filter_choices()
    assert not any("fleet_session" in q["sql"] for q in captured.captured_queries)
    assert choices.channels == ["slack", "webchat"]
    assert choices.kinds == ["direct", "group"] and choices.statuses == ["done"]
