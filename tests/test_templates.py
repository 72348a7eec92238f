"""The templates' shared pieces: the `{% ago %}` tag, badge classes from the models, and
guards against hand-written paths and relative times coming back."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.template import Context, Template
from django.utils import timezone

from alerts.models import Alert
from cron.models import CronJob
from fleet.models import Gateway, Session

TEMPLATES = Path(settings.BASE_DIR) / "templates"


def render(source: str, **context: Any) -> str:
    return Template("{% load timeago %}" + source).render(Context(context))


def test_it_renders_the_one_relative_time_form() -> None:
    at = timezone.now() - timedelta(minutes=5, seconds=10)
    html = render("{% ago at %}", at=at)
    local = timezone.localtime(at)
    assert html == (
        f'<time class="ago" datetime="{local.isoformat()}" '
        f'title="{local:%Y-%m-%d %H:%M:%S} {local.tzname()}">5\xa0minutes ago</time>'
    )


def test_it_renders_none_as_a_dash() -> None:
    assert render("[{% ago at %}]", at=None) == "[–]"
    assert render("[{% ago missing %}]") == "[–]"


def test_it_counts_in_two_units_like_the_browser() -> None:
    html = render("{% ago at %}", at=timezone.now() - timedelta(hours=3, minutes=5))
    assert ">3\xa0hours, 5\xa0minutes ago</time>" in html


def test_it_leaves_no_hand_written_relative_time() -> None:
    """Every "… ago" goes through the tag (templates/fleet/ago.html), the chat templates
    and the session page's transcript (chat's message partial) included."""
    offenders = []
    for path in TEMPLATES.rglob("*.html"):
        name = path.relative_to(TEMPLATES).as_posix()
        if name == "fleet/ago.html":
            continue
        text = path.read_text()
        if "|timesince" in text or 'class="ago"' in text:
            offenders.append(name)
    assert offenders == []


def test_it_leaves_no_hand_written_path_in_a_template() -> None:
    """Links, forms and htmx requests use {% url %}. (WebSocket addresses, `ws-connect`,
    are Channels routes, which `{% url %}` cannot name.)"""
    pattern = re.compile(r'\b(?:href|action|hx-(?:get|post|delete|put|patch))="/')
    offenders = [
        f"{path.relative_to(TEMPLATES)}: {match.group(0)}"
        for path in TEMPLATES.rglob("*.html")
        for match in pattern.finditer(path.read_text())
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("state", "badge"),
    [
        (Gateway.State.CONNECTED, "ok"),
        (Gateway.State.CONNECTING, "warn"),
        (Gateway.State.REST_FALLBACK, "warn"),
        (Gateway.State.PAIRING_REQUIRED, "bad"),
        (Gateway.State.AUTH_FAILED, "bad"),
        (Gateway.State.TLS_FAILED, "bad"),
        (Gateway.State.OFFLINE, "bad"),
    ],
)
def test_it_gives_each_gateway_state_a_badge(state: str, badge: str) -> None:
    assert Gateway(state=state).badge_class == badge


def test_it_gives_a_session_row_its_class_and_status() -> None:
    now = timezone.now()
    assert Session(has_active_run=True, gone_at=now).row_class == "is-running"
    assert Session(gone_at=now, status="done").row_class == "is-gone"
    assert Session(status="done").row_class == ""
    assert Session(gone_at=now, status="done").status_text == "gone"
    assert Session(status="done").status_text == "done"
    assert Session().status_text == "idle"


@pytest.mark.parametrize(
    ("status", "badge"),
    [
        (Alert.Status.OPEN, "bad"),
        (Alert.Status.ACKNOWLEDGED, "warn"),
        (Alert.Status.RESOLVED, "ok"),
    ],
)
def test_it_gives_each_alert_status_a_badge(status: str, badge: str) -> None:
    assert Alert(status=status).badge_class == badge


@pytest.mark.parametrize(
    ("job", "badge", "text"),
    [
        (CronJob(running=True, last_status="error"), "warn", "running"),
        (CronJob(last_status="error"), "bad", "error"),
        (CronJob(last_status="ok"), "ok", "ok"),
        (CronJob(last_status="skipped"), "", "skipped"),
        (CronJob(), "", "never ran"),
    ],
)
def test_it_gives_a_cron_job_its_badge(job: CronJob, badge: str, text: str) -> None:
    assert (job.badge_class, job.state_text) == (badge, text)


@pytest.mark.parametrize(
    "name", ["session-detail", "chat:session", "admin:fleet_session_change"]
)
@pytest.mark.parametrize("prefix", ["/", "/control/"])
def test_it_links_a_row_as_reverse_does(name: str, prefix: str) -> None:
    from django.urls import reverse, set_script_prefix

    from fleet.templatetags.links import link

    set_script_prefix(prefix)
    try:
        for pk in (1, 42, 2147483646):
            assert link(name, pk) == reverse(name, args=[pk])
        rendered = Template("{% load links %}{{ pk|link:name }}").render(
            Context({"pk": 7, "name": name})
        )
        assert rendered == reverse(name, args=[7])
        assert rendered.startswith(prefix)
    finally:
        set_script_prefix("/")
