"""The fleet pages over HTTP: login, roles, the session list's filters, search and paging,
escaping of gateway text, the login throttle, and /healthz."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from chat.models import Message, run_dom_id
from fleet.models import Agent, Gateway, PresenceEntry, Session
from fleet.services import summary

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture
def fleet_data(db: Any) -> dict[str, Any]:
    now = timezone.now()
    gw = Gateway.objects.create(
        name="alpha",
        url="ws://127.0.0.1:1",
        state=Gateway.State.CONNECTED,
        protocol=4,
        server_version="2026.9.6",
    )
    other = Gateway.objects.create(
        name="beta",
        url="ws://127.0.0.1:2",
        state=Gateway.State.OFFLINE,
        last_error="connection refused",
    )
    main = Agent.objects.create(gateway=gw, agent_id="main", model="fake-model")
    ops = Agent.objects.create(gateway=gw, agent_id="ops", name="Ops bot")
    sessions = []
    for i in range(120):
        sessions.append(
            Session(
                gateway=gw if i % 4 else other,
                key=f"agent:main:s{i:03d}",
                agent=main if i % 2 else ops,
                agent_key="main" if i % 2 else "ops",
                label=f"label {i:03d}",
                kind="direct" if i % 3 else "group",
                channel="telegram" if i % 5 else "slack",
                model="fake-model",
                status="running" if i == 7 else "done",
                has_active_run=i == 7,
                input_tokens=1000 + i,
                output_tokens=200,
                total_tokens=1200 + i,
                context_tokens=128000,
                updated_at=now - timedelta(minutes=i),
            )
        )
    Session.objects.bulk_create(sessions)
    Session.objects.create(
        gateway=gw, key="agent:main:gone", label="old one", gone_at=now
    )
    xss = Session.objects.create(
        gateway=gw,
        key="agent:main:xss",
        label=XSS,
        display_name=XSS,
        updated_at=now - timedelta(days=30),
    )
    PresenceEntry.objects.create(
        gateway=gw, instance_key="n1", host="node-1", mode="node"
    )
    PresenceEntry.objects.create(
        gateway=gw, instance_key="c1", host="laptop", mode="ui"
    )
    for g in (gw, other):  # rows written behind the writers' backs
        summary.refresh_summary(g.pk)
    return {"gw": gw, "other": other, "main": main, "ops": ops, "xss": xss}


def login(client: Client, user: User) -> Client:
    client.force_login(user)
    return client


def test_it_sends_anonymous_visitors_to_login(client: Client, fleet_data: Any) -> None:
    for url in ("/", f"/sessions/{fleet_data['xss'].pk}/", "/admin/"):
        response = client.get(url)
        assert response.status_code == 302, url
        assert "login" in response["Location"]


def test_it_keeps_healthz_public(client: Client, fleet_data: Any) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body == {
        "ok": True,
        "database": "ok",
        "states": {"connected": 1, "offline": 1},
        "held_by_worker": 0,
    }


def test_it_names_gateways_in_healthz_only_for_a_viewer(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    anonymous = client.get("/healthz").content.decode()
    for private in ("alpha", "beta", "2026.9.6", "connection refused"):
        assert private not in anonymous
    login(client, personas["dave"])  # an account without a role learns no more
    assert "alpha" not in client.get("/healthz").content.decode()
    login(client, personas["carol"])
    body = client.get("/healthz").json()
    assert body["states"] == {"connected": 1, "offline": 1}
    assert {g["name"]: g["state"] for g in body["gateways"]} == {
        "alpha": "connected",
        "beta": "offline",
    }
    alpha, beta = body["gateways"]
    assert alpha["version"] == "2026.9.6" and alpha["worker"] is False
    assert beta["error"] == "connection refused"
    assert "token" not in str(body).lower()


def test_it_refuses_an_account_without_a_role(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    login(client, personas["dave"])
    assert client.get("/").status_code == 403
    assert client.get(f"/sessions/{fleet_data['xss'].pk}/").status_code == 403


def test_it_shows_role_appropriate_links(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    pk = fleet_data["xss"].pk
    pages = {}
    for name in ("carol", "bob", "alice"):
        c = Client()
        login(c, personas[name])
        pages[name] = c.get("/?q=xss").content.decode()
    assert f'href="/chat/{pk}/"' not in pages["carol"]
    assert "/admin/fleet/session/" not in pages["carol"]
    assert f'href="/chat/{pk}/"' in pages["bob"]
    assert "/admin/fleet/session/" not in pages["bob"]
    assert f'href="/chat/{pk}/"' in pages["alice"]
    assert f"/admin/fleet/session/{pk}/change/" in pages["alice"]


def test_it_shows_gateways_agents_and_presence(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    login(client, personas["carol"])
    html = client.get("/").content.decode()
    assert f'id="gateway-{fleet_data["gw"].pk}"' in html
    assert "v2026.9.6" in html and "protocol 4" in html
    assert "Ops bot" in html and "fake-model" in html
    assert "1 client" in html and "1 node" in html
    # The offline gateway: a banner with "since" and the last error.
    assert "Offline</strong> since" in html
    assert "connection refused" in html
    assert 'ws-connect="/ws/fleet/"' in html


def test_it_shows_the_pairing_banner_with_the_approve_command(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    Gateway.objects.filter(pk=fleet_data["gw"].pk).update(
        state=Gateway.State.PAIRING_REQUIRED, pairing_request_id="req-123"
    )
    Gateway.objects.filter(pk=fleet_data["other"].pk).update(
        state=Gateway.State.REST_FALLBACK
    )
    login(client, personas["carol"])
    html = client.get("/").content.decode()
    assert "openclaw devices approve req-123" in html
    assert "REST fallback" in html


def test_it_pages_the_session_list_by_last_activity(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    login(client, personas["carol"])
    html = client.get("/").content.decode()
    assert "121 sessions" in html  # 120 + the xss one; the gone one is hidden
    assert "page 1 of 3" in html
    assert html.index("label 000") < html.index("label 001")
    assert "label 050" not in html
    page2 = client.get("/?page=2").content.decode()
    assert "label 050" in page2 and "label 000" not in page2
    # Past the end: the last page, not an error.
    assert "page 3 of 3" in client.get("/?page=999").content.decode()
    assert "page 1 of 3" in client.get("/?page=abc").content.decode()


def test_it_renders_only_the_list_for_htmx(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    login(client, personas["carol"])
    html = client.get("/?q=label 01", headers={"HX-Request": "true"}).content.decode()
    assert html.lstrip().startswith('<div id="session-list"')
    assert "<html" not in html
    assert 'data-query="q=label+01"' in html
    assert "label 010" in html and "label 020" not in html


@pytest.mark.parametrize(
    ("query", "present", "absent"),
    [
        ("status=running", ["label 007"], ["label 001"]),
        ("kind=group", ["label 003"], ["label 001"]),
        ("channel=slack", ["label 005"], ["label 001"]),
        ("q=S004", ["label 004"], ["label 005"]),  # key, case-insensitive
        ("q=old", [], ["old one"]),  # gone: hidden by default
        ("q=old&gone=1", ["old one"], []),
    ],
)
def test_it_filters_and_searches(
    client: Client,
    personas: dict[str, User],
    fleet_data: Any,
    query: str,
    present: list[str],
    absent: list[str],
) -> None:
    login(client, personas["carol"])
    html = client.get(f"/?{query}", headers={"HX-Request": "true"}).content.decode()
    for text in present:
        assert text in html, (query, text)
    for text in absent:
        assert text not in html, (query, text)


def test_it_filters_by_gateway_and_agent(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    login(client, personas["carol"])
    html = client.get(
        f"/?gateway={fleet_data['other'].pk}&agent={fleet_data['ops'].pk}",
        headers={"HX-Request": "true"},
    ).content.decode()
    # other gateway: i % 4 == 0; agent ops: i even -> every 4th
    assert "label 000" in html and "label 004" in html
    assert "label 002" not in html and "label 001" not in html
    assert "30 sessions" in html


def test_it_escapes_gateway_text(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    session = fleet_data["xss"]
    Message.objects.create(session=session, role="assistant", text=XSS)
    login(client, personas["alice"])
    for url in ("/?q=xss", f"/sessions/{session.pk}/"):
        html = client.get(url).content.decode()
        assert XSS not in html, url
        assert "&lt;img src=x onerror=alert(1)&gt;" in html, url


def test_it_shows_one_session_with_its_transcript(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    session = Session.objects.get(key="agent:main:s007")
    hello = Message.objects.create(session=session, role="user", text="hello there")
    Message.objects.create(
        session=session, role="assistant", text="general **kenobi**", run_id="r1"
    )
    login(client, personas["bob"])
    response = client.get(f"/sessions/{session.pk}/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "agent:main:s007" in html and "label 007" in html
    assert "hello there" in html and "general <strong>kenobi</strong>" in html
    assert html.index("hello there") < html.index("kenobi")
    # The chat's own message partial draws it (chat's {% session_transcript %} tag).
    assert f'<article id="msg-{hello.pk}" class="msg user state-final">' in html
    assert f'<article id="{run_dom_id("r1")}" class="msg assistant' in html
    assert f'href="/chat/{session.pk}/"' in html
    assert f'ws-connect="/ws/sessions/{session.pk}/"' in html
    assert client.get("/sessions/999999/").status_code == 404


def test_it_shows_the_newest_of_a_long_transcript_and_links_the_chat(
    client: Client, personas: dict[str, User], fleet_data: Any
) -> None:
    session = Session.objects.get(key="agent:main:s007")
    start = timezone.now() - timedelta(hours=1)
    for n in range(31):
        Message.objects.create(
            session=session,
            role="user",
            text=f"line {n:02d}",
            created_at=start + timedelta(minutes=n),
        )
    login(client, personas["bob"])
    html = client.get(f"/sessions/{session.pk}/").content.decode()
    assert "line 00" not in html and "line 01" in html and "line 30" in html
    assert f'<a class="older" href="/chat/{session.pk}/">' in html


def test_it_slows_down_repeated_failed_logins(
    client: Client, personas: dict[str, User], settings: Any
) -> None:
    settings.LOGIN_FAILURES_PER_ACCOUNT = 3
    settings.LOGIN_ACCOUNTS_PER_ADDRESS = 3
    for _ in range(3):
        r = client.post("/accounts/login/", {"username": "carol", "password": "nope"})
        assert r.status_code == 200
    # The account is now throttled, even with the right password.
    r = client.post("/accounts/login/", {"username": "carol", "password": "password"})
    assert r.status_code == 429
    assert "Too many failed attempts" in r.content.decode()
    assert int(r["Retry-After"]) > 0
    # Another account from the same address still works, until the address limit.
    r = client.post("/accounts/login/", {"username": "bob", "password": "password"})
    assert r.status_code == 302
    # The address's limit counts accounts tried, not failures: carol, zed and yan make
    # three, and the address may try no fourth account.
    other = Client()
    for name in ("zed", "zed", "yan"):
        other.post("/accounts/login/", {"username": name, "password": "x"})
    r = other.post("/accounts/login/", {"username": "alice", "password": "password"})
    assert r.status_code == 429
    # carol's real password from another address is accepted at once.
    elsewhere = Client(REMOTE_ADDR="192.0.2.44")
    r = elsewhere.post(
        "/accounts/login/", {"username": "carol", "password": "password"}
    )
    assert r.status_code == 302


def test_it_logs_in_and_out(client: Client, personas: dict[str, User]) -> None:
    r = client.post("/accounts/login/", {"username": "carol", "password": "password"})
    assert r.status_code == 302 and r["Location"] == "/"
    assert client.get("/").status_code == 200
    client.post("/accounts/logout/")
    assert client.get("/").status_code == 302
