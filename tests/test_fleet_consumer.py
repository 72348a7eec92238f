"""The fleet consumers through the real ASGI stack (Origin check, session auth, routing),
with Channels communicators: refusals, the state on connect, fragments after worker notes,
coalescing, and one round through the real Redis channel layer."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import override_settings
from django.utils import timezone

from fleet import consumers
from fleet.groups import fleet_group, session_group
from fleet.models import Agent, Gateway, Session
from tests.helpers import XSS, RedisServer, asgi_application, connect, receive_all

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups", "in_memory_layer"),
]


@pytest.fixture
def fleet_rows(transactional_db: Any) -> dict[str, Any]:
    now = timezone.now()
    gw = Gateway.objects.create(
        name="alpha", url="ws://127.0.0.1:1", state=Gateway.State.CONNECTED, protocol=4
    )
    agent = Agent.objects.create(gateway=gw, agent_id="main", model="fake-model")
    rows = [
        Session.objects.create(
            gateway=gw,
            agent=agent,
            key=f"agent:main:s{i}",
            label=f"row {i}",
            status="done",
            updated_at=now - timedelta(minutes=i),
        )
        for i in range(5)
    ]
    return {"gw": gw, "agent": agent, "rows": rows}


async def test_it_refuses_an_anonymous_socket(fleet_rows: Any) -> None:
    communicator = WebsocketCommunicator(
        asgi_application(), "/ws/fleet/", headers=[(b"origin", b"http://localhost")]
    )
    connected, _ = await communicator.connect(timeout=5)
    assert not connected
    await communicator.disconnect()


async def test_it_refuses_a_foreign_origin(fleet_rows: Any, headers_for: Any) -> None:
    headers = await sync_to_async(headers_for)("alice", "http://evil.example")
    communicator = WebsocketCommunicator(
        asgi_application(), "/ws/fleet/", headers=headers
    )
    connected, _ = await communicator.connect(timeout=5)
    assert not connected
    await communicator.disconnect()


async def test_it_refuses_an_account_without_a_role(
    fleet_rows: Any, headers_for: Any
) -> None:
    headers = await sync_to_async(headers_for)("dave")
    for path in ("/ws/fleet/", f"/ws/sessions/{fleet_rows['rows'][0].pk}/"):
        communicator = WebsocketCommunicator(asgi_application(), path, headers=headers)
        connected, _ = await communicator.connect(timeout=5)
        assert not connected, path
        await communicator.disconnect()


async def test_it_sends_the_current_state_on_connect(
    fleet_rows: Any, headers_for: Any
) -> None:
    communicator = await connect(
        "/ws/fleet/", await sync_to_async(headers_for)("carol")
    )
    html = await receive_all(communicator)
    assert f'id="gateway-{fleet_rows["gw"].pk}"' in html
    # Each list part says which filters it was rendered for (none here).
    assert '<tbody id="session-rows" data-for="">' in html
    assert 'id="session-pager" data-for=""' in html
    for row in fleet_rows["rows"]:
        assert f'id="session-{row.pk}"' in html
    assert "/chat/" not in html  # carol is a viewer
    await communicator.disconnect()


async def test_it_respects_the_filters_in_the_socket_url(
    fleet_rows: Any, headers_for: Any
) -> None:
    communicator = await connect(
        "/ws/fleet/?q=row+3", await sync_to_async(headers_for)("bob")
    )
    html = await receive_all(communicator)
    rows = fleet_rows["rows"]
    assert f'id="session-{rows[3].pk}"' in html
    assert f'id="session-{rows[1].pk}"' not in html
    assert f'href="/chat/{rows[3].pk}/"' in html  # bob operates
    assert '<tbody id="session-rows" data-for="q=row+3">' in html
    await communicator.disconnect()


async def test_it_pushes_a_changed_row_after_a_note(
    fleet_rows: Any, headers_for: Any
) -> None:
    communicator = await connect(
        "/ws/fleet/", await sync_to_async(headers_for)("carol")
    )
    await receive_all(communicator)
    row = fleet_rows["rows"][2]
    await Session.objects.filter(pk=row.pk).aupdate(label=XSS, display_name=XSS)
    await get_channel_layer().group_send(
        fleet_group(),
        {
            "type": "fleet.sessions",
            "gateway_id": row.gateway_id,
            "session_ids": [row.pk],
        },
    )
    html = await receive_all(communicator)
    assert f'<tr id="session-{row.pk}"' in html
    assert 'id="session-rows"' not in html  # in place: the order did not change
    assert 'id="gateway-' in html  # the note did not say the counts stayed
    assert XSS not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    await communicator.disconnect()


async def test_it_leaves_the_cards_alone_when_the_counts_stayed(
    fleet_rows: Any, headers_for: Any
) -> None:
    communicator = await connect(
        "/ws/fleet/", await sync_to_async(headers_for)("carol")
    )
    await receive_all(communicator)
    row = fleet_rows["rows"][1]
    await Session.objects.filter(pk=row.pk).aupdate(label="only the label")
    await get_channel_layer().group_send(
        fleet_group(),
        {
            "type": "fleet.sessions",
            "gateway_id": row.gateway_id,
            "session_ids": [row.pk],
            "counts": False,
        },
    )
    html = await receive_all(communicator)
    assert f'<tr id="session-{row.pk}"' in html and "only the label" in html
    assert 'id="gateway-' not in html
    await communicator.disconnect()


async def test_it_sends_the_whole_page_when_a_row_moves(
    fleet_rows: Any, headers_for: Any
) -> None:
    communicator = await connect(
        "/ws/fleet/", await sync_to_async(headers_for)("carol")
    )
    await receive_all(communicator)
    last = fleet_rows["rows"][-1]
    await Session.objects.filter(pk=last.pk).aupdate(
        updated_at=timezone.now(), label="now on top"
    )
    await get_channel_layer().group_send(
        fleet_group(),
        {
            "type": "fleet.sessions",
            "gateway_id": last.gateway_id,
            "session_ids": [last.pk],
        },
    )
    html = await receive_all(communicator)
    assert 'id="session-rows"' in html
    assert html.index(f'id="session-{last.pk}"') < html.index(
        f'id="session-{fleet_rows["rows"][0].pk}"'
    )
    await communicator.disconnect()


async def test_it_rerenders_the_gateway_card(fleet_rows: Any, headers_for: Any) -> None:
    communicator = await connect(
        "/ws/fleet/", await sync_to_async(headers_for)("carol")
    )
    await receive_all(communicator)
    gw = fleet_rows["gw"]
    await Gateway.objects.filter(pk=gw.pk).aupdate(
        state=Gateway.State.OFFLINE, last_error="gone fishing"
    )
    await get_channel_layer().group_send(
        fleet_group(), {"type": "fleet.gateway", "gateway_id": gw.pk}
    )
    html = await receive_all(communicator)
    assert html.lstrip().startswith(
        f'<article class="gw-card panel state-offline" id="gateway-{gw.pk}"'
    )
    assert "gone fishing" in html
    await communicator.disconnect()


async def test_it_coalesces_a_burst(fleet_rows: Any, headers_for: Any) -> None:
    communicator = await connect(
        "/ws/fleet/", await sync_to_async(headers_for)("carol")
    )
    await receive_all(communicator)
    row = fleet_rows["rows"][1]
    layer = get_channel_layer()
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(50):
        await Session.objects.filter(pk=row.pk).aupdate(label=f"burst {i}")
        await layer.group_send(
            fleet_group(),
            {
                "type": "fleet.sessions",
                "gateway_id": row.gateway_id,
                "session_ids": [row.pk],
            },
        )
        await asyncio.sleep(0.01)
    frames = []
    # receive_nothing waits without cancelling the consumer (receive_from would).
    while not await communicator.receive_nothing(timeout=1):
        frames.append(await communicator.receive_from(timeout=1))
    elapsed = loop.time() - started - 1
    # A push is a card frame and a rows frame. At most one push per push interval, and
    # the last one shows the final state.
    pushes = [f for f in frames if f"session-{row.pk}" in f]
    interval = consumers.FleetConsumer.push_interval
    assert 1 <= len(pushes) <= int(elapsed / interval) + 2, (len(pushes), elapsed)
    assert "burst 49" in pushes[-1]
    await communicator.disconnect()


async def test_it_follows_the_filters_the_page_sends(
    fleet_rows: Any, headers_for: Any
) -> None:
    communicator = await connect(
        "/ws/fleet/", await sync_to_async(headers_for)("carol")
    )
    await receive_all(communicator)
    await communicator.send_to(text_data='{"query": "q=row+4"}')
    await asyncio.sleep(0.2)
    rows = fleet_rows["rows"]
    await Session.objects.filter(pk=rows[0].pk).aupdate(label="row 0 changed")
    await get_channel_layer().group_send(
        fleet_group(),
        {
            "type": "fleet.sessions",
            "gateway_id": rows[0].gateway_id,
            "session_ids": [rows[0].pk],
        },
    )
    # Row 0 is not on this filtered page: only the gateway card (its counts) comes.
    html = await receive_all(communicator)
    assert f'id="session-{rows[0].pk}"' not in html
    assert 'id="session-rows"' not in html
    # The whole list, when it comes, is the filtered one and says so.
    await get_channel_layer().group_send(
        fleet_group(), {"type": "fleet.sessions", "gateway_id": rows[0].gateway_id}
    )
    html = await receive_all(communicator)
    assert '<tbody id="session-rows" data-for="q=row+4">' in html
    assert f'id="session-{rows[4].pk}"' in html
    assert f'id="session-{rows[0].pk}"' not in html
    await communicator.disconnect()


async def test_the_session_page_follows_its_session(
    fleet_rows: Any, headers_for: Any
) -> None:
    from chat.models import Message

    row = fleet_rows["rows"][0]
    communicator = await connect(
        f"/ws/sessions/{row.pk}/", await sync_to_async(headers_for)("carol")
    )
    html = await receive_all(communicator)
    assert 'id="session-fields"' in html and 'id="transcript"' in html
    await Message.objects.acreate(session=row, role="assistant", text=XSS)
    await get_channel_layer().group_send(
        session_group(row.pk), {"type": "chat.stored", "message_id": "x"}
    )
    html = await receive_all(communicator)
    assert html.lstrip().startswith('<section class="panel" id="transcript">')
    assert XSS not in html and "&lt;img" in html
    await communicator.disconnect()


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


async def test_it_works_over_the_redis_channel_layer(
    fleet_rows: Any, headers_for: Any
) -> None:
    if not _redis_up():
        if os.environ.get("CI") == "true":
            pytest.fail("Redis is not reachable on 127.0.0.1:6379")
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    layers = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": ["redis://127.0.0.1:6379/0"],
                "prefix": f"cc-test-{secrets.token_hex(4)}",
            },
        }
    }
    with override_settings(CHANNEL_LAYERS=layers):
        headers = await sync_to_async(headers_for)("carol")
        communicator = await connect("/ws/fleet/", headers)
        await receive_all(communicator)
        row = fleet_rows["rows"][0]
        await Session.objects.filter(pk=row.pk).aupdate(label="via redis")
        layer = get_channel_layer()
        assert type(layer).__name__ == "RedisChannelLayer"
        await layer.group_send(
            fleet_group(),
            {
                "type": "fleet.sessions",
                "gateway_id": row.gateway_id,
                "session_ids": [row.pk],
            },
        )
        html = await receive_all(communicator)
        assert "via redis" in html
        await communicator.disconnect()
        await layer.flush()


async def test_the_sockets_of_a_process_share_one_subscription(
    fleet_rows: Any, headers_for: Any
) -> None:
    headers = await sync_to_async(headers_for)("carol")
    sockets = [await connect("/ws/fleet/", headers) for _ in range(3)]
    for communicator in sockets:
        await receive_all(communicator)
    layer = get_channel_layer()
    assert len(layer.groups[fleet_group()]) == 1  # one channel, not one per socket
    row = fleet_rows["rows"][0]
    await Session.objects.filter(pk=row.pk).aupdate(label="to all three")
    await layer.group_send(
        fleet_group(),
        {
            "type": "fleet.sessions",
            "gateway_id": row.gateway_id,
            "session_ids": [row.pk],
        },
    )
    for communicator in sockets:
        assert "to all three" in await receive_all(communicator)
    for communicator in sockets:
        await communicator.disconnect()
    assert not layer.groups.get(fleet_group())  # the last one out left the group


async def test_live_updates_resume_after_redis_comes_back(
    fleet_rows: Any, headers_for: Any, own_redis: RedisServer
) -> None:
    layers = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [own_redis.url]},
        }
    }
    with override_settings(CHANNEL_LAYERS=layers):
        communicator = await connect(
            "/ws/fleet/", await sync_to_async(headers_for)("carol")
        )
        await receive_all(communicator)
        # Redis goes away, and comes back empty: the group membership is gone with it.
        await sync_to_async(own_redis.stop)()
        row = fleet_rows["rows"][0]
        await Session.objects.filter(pk=row.pk).aupdate(label="changed while away")
        await asyncio.sleep(1.0)
        await sync_to_async(own_redis.start)()
        # What changed meanwhile arrives without a note: the page is refreshed.
        html = await receive_all(communicator, quiet=0.5)
        assert "changed while away" in html
        # And notes reach the socket again.
        await Session.objects.filter(pk=row.pk).aupdate(label="after the return")
        await get_channel_layer().group_send(
            fleet_group(),
            {
                "type": "fleet.sessions",
                "gateway_id": row.gateway_id,
                "session_ids": [row.pk],
            },
        )
        assert "after the return" in await receive_all(communicator)
        await communicator.disconnect()


async def test_sockets_with_the_same_view_share_each_render_of_a_burst(
    fleet_rows: Any, headers_for: Any, monkeypatch: Any
) -> None:
    """Twenty sockets, notes coming faster than the push interval (as at fifty gateways):
    the sockets flush on the same slots with the same notes, so each slot costs one render
    of the changed rows for the view, not one per socket."""
    renders: list[Any] = []
    real = consumers.render_sessions_update

    def counted(*args: Any) -> Any:
        renders.append(args[1])
        return real(*args)

    monkeypatch.setattr(consumers, "render_sessions_update", counted)
    headers = await sync_to_async(headers_for)("carol")
    sockets = []
    for _ in range(20):  # connected a little apart: each push interval starts elsewhere
        sockets.append(await connect("/ws/fleet/", headers))
        await receive_all(sockets[-1])
        await asyncio.sleep(0.01)
    row = fleet_rows["rows"][1]
    layer = get_channel_layer()
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(30):
        await Session.objects.filter(pk=row.pk).aupdate(label=f"burst {i}")
        await layer.group_send(
            fleet_group(),
            {
                "type": "fleet.sessions",
                "gateway_id": row.gateway_id,
                "session_ids": [row.pk],
                "counts": False,
            },
        )
        await asyncio.sleep(0.02)
    for communicator in sockets:
        last = ""
        while not await communicator.receive_nothing(timeout=0.5):
            last = await communicator.receive_from(timeout=1)
        assert "burst 29" in last
        await communicator.disconnect()
    elapsed = loop.time() - started
    slots = int(elapsed / consumers.FleetConsumer.push_interval) + 2
    # Per socket that would be up to 20 x slots; shared, about one per slot.
    assert 1 <= len(renders) <= slots, (len(renders), slots)


def test_busy_sockets_flush_on_one_grid_whenever_their_sends_ended() -> None:
    """The slot a socket flushes on next depends on the slot it last flushed on, not on
    when its sends ended (which differ between 200 sockets under load): sockets that
    flushed together stay together, and sockets that connected apart meet on the push
    interval's grid. Otherwise notes landing between their timers split them into
    different pending sets, and every socket renders on its own."""
    interval = consumers.FleetConsumer.push_interval
    last = 100 * interval
    assert {
        round(consumers._slot(last + ended, last, interval), 9)
        for ended in (0.001, 0.03, 0.07)
    } == {round(last + interval, 9)}
    connected = [last + d for d in (0.003, 0.021, 0.048, 0.077)]
    slots = {round(consumers._slot(t + 0.01, t, interval), 9) for t in connected}
    assert len(slots) <= 2  # the next one or two grid points, not four clocks
    assert all(abs(s / interval - round(s / interval)) < 1e-6 for s in slots)
    # An idle socket goes soon: within a coalescing window.
    idle = consumers._slot(last + 5, last, interval)
    assert last + 5 <= idle <= last + 5 + consumers.COALESCE_WINDOW
