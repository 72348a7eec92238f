"""The fleet page at many gateways (issue 16): above FLEET_CARDS_UP_TO gateways a compact
table sorted with problems first; a page per gateway with its full card; live, one change on
one gateway re-renders its row only, and a change that moves a row re-renders the table."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from fleet import queries
from fleet.groups import fleet_group
from fleet.models import Agent, Gateway, Session
from fleet.services import summary
from tests.helpers import XSS, connect, receive_all

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups", "in_memory_layer"),
]
State = Gateway.State


@pytest.fixture
def many(transactional_db: Any) -> list[Gateway]:
    """Eight gateways: six connected (held by a worker), one offline, one failing auth."""
    future = timezone.now() + timedelta(minutes=5)
    gateways = [
        Gateway.objects.create(
            name=f"gw-{i}",
            url=f"ws://127.0.0.1:{i + 1}",
            state=State.CONNECTED,
            protocol=4,
            server_version="2026.9.6",
            lease_owner="w:1:x",
            worker_channel="chan",
            lease_expires_at=future,
            last_event_at=timezone.now(),
        )
        for i in range(6)
    ]
    gateways.append(
        Gateway.objects.create(
            name="gw-offline",
            url="ws://127.0.0.1:7",
            state=State.OFFLINE,
            last_error=f"refused {XSS}",
        )
    )
    gateways.append(
        Gateway.objects.create(
            name="gw-auth", url="ws://127.0.0.1:8", state=State.AUTH_FAILED
        )
    )
    agent = Agent.objects.create(gateway=gateways[0], agent_id="main")
    for i in range(3):
        Session.objects.create(
            gateway=gateways[0],
            agent=agent,
            key=f"agent:main:s{i}",
            has_active_run=i == 0,
        )
    # Rows written behind the writers' backs: recount, as a full sync would.
    summary.refresh_summary(gateways[0].pk)
    return gateways


def _login(personas: dict[str, User], name: str) -> Client:
    client = Client()
    client.force_login(personas[name])
    return client


def test_the_fleet_page_shows_a_table_problems_first(
    many: list[Gateway], personas: dict[str, User]
) -> None:
    html = _login(personas, "carol").get(reverse("fleet")).content.decode()
    assert 'class="gw-table"' in html and "gw-card" not in html
    order = [html.index(f">{g.name}</a>") for g in many]
    # auth failed, offline, then the connected ones by name
    assert order[7] < order[6] < min(order[:6])
    assert order[:6] == sorted(order[:6])
    assert XSS not in html and "refused &lt;img" in html
    row = html[html.index(f'id="gateway-{many[0].pk}"') :]
    row = row[: row.index("</tr>")]
    assert "2026.9.6" in row and ">3</a>" in row and "running-text" in row
    assert f'href="{reverse("gateway-detail", args=[many[0].pk])}"' in row


def test_a_few_gateways_keep_their_cards(
    many: list[Gateway], personas: dict[str, User], settings: Any
) -> None:
    settings.FLEET_CARDS_UP_TO = 10
    html = _login(personas, "carol").get(reverse("fleet")).content.decode()
    assert "gw-card" in html and 'class="gw-table"' not in html


def test_the_gateway_page_shows_its_card_and_links_its_sessions(
    many: list[Gateway], personas: dict[str, User]
) -> None:
    client = _login(personas, "carol")
    gw = many[0]
    html = client.get(reverse("gateway-detail", args=[gw.pk])).content.decode()
    assert f'id="gateway-{gw.pk}"' in html and "gw-card" in html
    assert f"?gateway={gw.pk}" in html and "main" in html
    assert client.get(reverse("gateway-detail", args=[999999])).status_code == 404
    listing = client.get(reverse("fleet"), {"gateway": gw.pk}).content.decode()
    assert listing.count('<tr id="session-') == 3  # the list filtered by the gateway


def test_the_filters_name_each_agent_by_its_gateway_and_keep_the_selection(
    many: list[Gateway], personas: dict[str, User]
) -> None:
    gw = many[1]
    other = Agent.objects.create(gateway=gw, agent_id="ops", name="Ops")
    html = (
        _login(personas, "carol")
        .get(reverse("fleet"), {"agent": other.pk, "gateway": gw.pk})
        .content.decode()
    )
    agents = html[html.index('name="agent"') :]
    agents = agents[: agents.index("</select>")]
    assert f'<option value="{other.pk}" selected>Ops (gw-1)</option>' in agents
    assert ">main (gw-0)</option>" in agents and agents.count(" selected") == 1
    gateways = html[html.index('name="gateway"') :]
    gateways = gateways[: gateways.index("</select>")]
    assert f'<option value="{gw.pk}" selected>gw-1</option>' in gateways
    assert gateways.count(" selected") == 1 and gateways.count("<option") == 9


def test_the_gateway_page_needs_a_role(
    many: list[Gateway], personas: dict[str, User]
) -> None:
    url = reverse("gateway-detail", args=[many[0].pk])
    assert Client().get(url).status_code == 302
    assert _login(personas, "dave").get(url).status_code == 403


def test_rows_are_read_in_two_queries(
    many: list[Gateway], django_assert_max_num_queries: Any
) -> None:
    with django_assert_max_num_queries(2):
        rows = queries.gateway_rows()
    assert [r.gateway.name for r in rows[:2]] == ["gw-auth", "gw-offline"]


def test_the_unfiltered_list_totals_the_gateway_rows_instead_of_counting(
    many: list[Gateway],
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for filters, total in (
        ({}, 3),
        ({"gateway": many[0].pk}, 3),
        ({"gateway": many[1].pk}, 0),
    ):
        with CaptureQueriesContext(connection) as captured:
            page = queries.session_page(queries.parse_filters(filters))
        assert page.total == total
        assert not any(
            "COUNT" in q["sql"] and "fleet_session" in q["sql"]
            for q in captured.captured_queries
        )
    # Any other filter counts the rows it matches.
    page = queries.session_page(queries.parse_filters({"q": "s1"}))
    assert page.total == 1 and [s.key for s in page.rows] == ["agent:main:s1"]


async def test_a_change_on_one_gateway_rerenders_its_row_only(
    many: list[Gateway], headers_for: Any
) -> None:
    communicator = await connect(
        "/ws/fleet/", await sync_to_async(headers_for)("carol")
    )
    first = await receive_all(communicator)
    assert 'class="gw-table"' in first
    gw = many[3]
    await Gateway.objects.filter(pk=gw.pk).aupdate(server_version="2026.10.1")
    await get_channel_layer().group_send(
        fleet_group(), {"type": "fleet.gateway", "gateway_id": gw.pk}
    )
    html = await receive_all(communicator)
    assert html.lstrip().startswith(f'<tr id="gateway-{gw.pk}"')
    assert html.count("<tr") == 1 and "2026.10.1" in html
    # Going offline moves it up among the problems: the whole table, in its new order.
    await Gateway.objects.filter(pk=gw.pk).aupdate(
        state=State.OFFLINE, last_error="gone fishing"
    )
    await get_channel_layer().group_send(
        fleet_group(), {"type": "fleet.gateway", "gateway_id": gw.pk}
    )
    html = await receive_all(communicator)
    assert html.lstrip().startswith('<div id="gateways"')
    assert html.index(">gw-3</a>") < html.index(">gw-0</a>")
    assert "gone fishing" in html
    await communicator.disconnect()


async def test_a_session_change_rerenders_its_gateways_row_with_the_new_count(
    many: list[Gateway], headers_for: Any
) -> None:
    from fleet import services

    communicator = await connect(
        "/ws/fleet/", await sync_to_async(headers_for)("carol")
    )
    await receive_all(communicator)
    gw = many[2]
    # Through the service the worker calls: the row's count moves in the same transaction.
    change = await sync_to_async(services.apply_session_changed)(
        gw.pk, {"sessionKey": "agent:main:new", "session": {"key": "agent:main:new"}}
    )
    await get_channel_layer().group_send(
        fleet_group(),
        {
            "type": "fleet.sessions",
            "gateway_id": gw.pk,
            "session_ids": [change.session_id],
            "counts": change.counts_changed,
        },
    )
    html = await receive_all(communicator)
    rows = [part for part in html.split("<tr") if 'id="gateway-' in part]
    assert len(rows) == 1 and rows[0].lstrip().startswith(f'id="gateway-{gw.pk}"')
    assert ">1</a>" in rows[0]
    await communicator.disconnect()


async def test_a_render_in_flight_is_shared_and_late_callers_share_the_next() -> None:
    from fleet.consumers import _shared

    loop = asyncio.get_running_loop()
    started: list[float] = []

    async def work() -> float:
        started.append(loop.time())
        await asyncio.sleep(0.05)
        return started[-1]

    async def caller(delay: float) -> tuple[float, float]:
        await asyncio.sleep(delay)
        asked = loop.time()
        return asked, await _shared("view", asked, work)

    results = await asyncio.gather(*(caller(i * 0.002) for i in range(40)))
    # Every caller got a render that began at or after it asked, and 40 callers arriving
    # during one render shared two renders (the first, then the one queued behind it).
    assert all(began >= asked for asked, began in results)
    assert len(started) <= 3


async def test_many_sockets_connecting_at_once_share_the_state_render(
    many: list[Gateway], headers_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet import consumers

    renders: list[int] = []
    real = consumers.render_fleet_state

    def counted(viewer: Any) -> Any:
        renders.append(1)
        return real(viewer)

    monkeypatch.setattr(consumers, "render_fleet_state", counted)
    headers = await sync_to_async(headers_for)("carol")
    sockets = await asyncio.gather(*(connect("/ws/fleet/", headers) for _ in range(30)))
    states = await asyncio.gather(*(receive_all(s) for s in sockets))
    assert all('class="gw-table"' in state for state in states)
    assert len(renders) <= 4, len(renders)
    await asyncio.gather(*(s.disconnect() for s in sockets))


def test_the_cached_ago_says_what_timesince_says() -> None:
    from django.utils.timesince import timesince

    from fleet.templatetags.timeago import since

    now = timezone.now()
    for seconds in (
        0,
        30,
        90,
        3570,
        3690,
        86400 * 3 + 7,
        86400 * 27 + 3000,
        86400 * 40,
    ):
        value = now - timedelta(seconds=seconds)
        assert since(value) == timesince(value), seconds
