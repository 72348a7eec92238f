"""The chat pages. Reading needs the viewer role, sending and stopping the operator role
(checked here, and again by the worker before anything reaches the gateway).

Send and abort hand the call to the worker and answer at once (`wait=False`); the worker
records the outcome (the message's state, the audit result) and then pushes it to the
session's group, where the page's consumer shows it.
A view must not wait for the worker: WhiteNoise's middleware is sync-only, so every view,
async ones too, holds the shared sync thread for its whole run, and in a single process
(`serve`, tests) the worker needs that thread for its own database calls."""

from __future__ import annotations

import uuid
from typing import Any, cast

from channels.db import database_sync_to_async
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from chat import reading, sending
from chat.forms import AbortForm, SendForm
from chat.models import Message, run_dom_id
from fleet import audit, roles
from fleet.calls import GatewayUnavailable, acall
from fleet.groups import session_group
from fleet.models import Agent, AuditEvent, Gateway, Session
from fleet.queries import session_for_user
from fleet.services import summary

db = database_sync_to_async
FRAGMENTS = "chat/fragments.html"


def _composer_context(chat_session: Session, **extra: Any) -> dict[str, Any]:
    agent = chat_session.agent
    return {
        "session_pk": chat_session.pk,
        "new_message_id": uuid.uuid4(),
        "max_chars": sending.MAX_MESSAGE_CHARS,
        "agent_name": agent.title if agent else chat_session.agent_key,
        **extra,
    }


def _page(request: HttpRequest, session: Session, history_note: str) -> HttpResponse:
    messages, more = reading.recent_messages(session)
    context = _composer_context(
        session,
        session=session,
        messages=messages,
        more=more,
        history_note=history_note,
        can_chat=roles.can_chat(request.user),
    )
    return render(request, "chat/session.html", context)


@require_GET
def session_page(request: HttpRequest, pk: int) -> HttpResponse:
    """The transcript we hold; the page's WebSocket back-fills it from the gateway on first
    view (see ChatConsumer.connect), since a view must not wait on the worker (see send)."""
    session = session_for_user(request.user, pk)
    note = ""
    if session.gone_at is not None or session.deleted_at is not None:
        note = (
            "This session is gone from the gateway; its stored transcript is kept here."
        )
    return _page(request, session, note)


@require_POST
def new_chat(request: HttpRequest) -> HttpResponse:
    """A new session key for an agent: agent:<agentId>:cc-<unique>. The gateway creates the
    session on the first chat.send; the row exists now so the page has somewhere to be.
    A POST (with CSRF): it creates a row, so a link, a prefetch or another site's <img>
    must not."""
    if not roles.can_chat(request.user):
        raise PermissionDenied("operator role needed")
    try:
        gateway = Gateway.objects.get(pk=int(request.POST.get("gateway", "")))
    except (ValueError, Gateway.DoesNotExist):
        raise Http404("no such gateway") from None
    agent_id = request.POST.get("agent", "").strip()
    agent = Agent.objects.filter(gateway=gateway, agent_id=agent_id).first()
    if agent is None:
        raise Http404("no such agent on that gateway")
    key = f"agent:{agent.agent_id}:cc-{uuid.uuid4().hex[:12]}"
    with transaction.atomic():
        session = Session.objects.create(
            gateway=gateway,
            key=key,
            agent=agent,
            agent_key=agent.agent_id,
            model=agent.model,
        )
        summary.refresh_counts(gateway.pk)
    return HttpResponseRedirect(reverse("chat:session", args=[session.pk]))


# -- send ---------------------------------------------------------------------------------


def _prepare_send(
    request: HttpRequest, user: Any, pk: int
) -> tuple[Session, Message | None, bool, SendForm]:
    session = session_for_user(user, pk, chat=True)
    form = SendForm(request.POST)
    if not form.is_valid():
        return session, None, False, form
    message, created = sending.create_user_message(
        session, user, form.cleaned_data["text"], form.cleaned_data["message_id"]
    )
    if message.session_id != session.pk:
        raise PermissionDenied("that message id belongs to another session")
    return session, message, created, form


def _send_response(
    request: HttpRequest,
    session: Session,
    message: Message | None,
    form: SendForm,
    error: str = "",
) -> HttpResponse:
    """The user's message and a reply placeholder (appended to #messages), a fresh composer,
    and the run bar, all out of band."""
    parts = []
    if message is not None:
        message.refresh_from_db()
        parts.append(render_to_string(f"{FRAGMENTS}#message", {"message": message}))
        if message.state in (Message.State.PENDING, Message.State.SENT):
            parts.append(
                render_to_string(
                    f"{FRAGMENTS}#placeholder", {"dom_id": run_dom_id(message.run_id)}
                )
            )
    running = message is not None and message.state in (
        Message.State.PENDING,
        Message.State.SENT,
    )
    keep_text = "" if running else form.data.get("text", "")
    parts.append(
        render_to_string(
            f"{FRAGMENTS}#composer",
            _composer_context(
                session,
                oob=True,
                text=keep_text,
                error=error or _form_error(form),
            ),
            request=request,
        )
    )
    parts.append(
        render_to_string(
            f"{FRAGMENTS}#runbar",
            {
                "oob": True,
                "running": running,
                "phase": "Sending…",
                "can_chat": True,
                "session_pk": session.pk,
                "run_id": message.run_id if message else "",
                "notice": error,
            },
        )
    )
    return HttpResponse("".join(parts))


def _form_error(form: SendForm) -> str:
    if form.is_bound and form.errors:
        return " ".join(str(e) for errors in form.errors.values() for e in errors)
    return ""


@require_POST
async def send(request: HttpRequest, pk: int) -> HttpResponse:
    user = await request.auser()
    session, message, created, form = await db(_prepare_send)(request, user, pk)
    if message is None:
        return cast(
            HttpResponse, await db(_send_response)(request, session, None, form)
        )
    if not created and message.state not in (
        Message.State.PENDING,
        Message.State.ERROR,
    ):
        # A double submit: the first one sent it.
        return cast(
            HttpResponse, await db(_send_response)(request, session, message, form)
        )
    error = await sending.asend_message(session, user, message, request=request)
    return cast(
        HttpResponse, await db(_send_response)(request, session, message, form, error)
    )


# -- abort --------------------------------------------------------------------------------


@require_POST
async def abort(request: HttpRequest, pk: int) -> HttpResponse:
    user = await request.auser()
    session = await db(session_for_user)(user, pk, chat=True)
    form = AbortForm(request.POST)
    if not form.is_valid():
        # Refused, not widened: without its run id the abort would stop every run.
        return HttpResponse(
            " ".join(str(e) for errors in form.errors.values() for e in errors),
            status=400,
            content_type="text/plain; charset=utf-8",
        )
    run_id = form.cleaned_data["run_id"]
    params: dict[str, Any] = {"sessionKey": session.key}
    if run_id:
        params["runId"] = run_id
    event = await db(audit.record)(
        "chat.abort", request=request, session=session, params=dict(params)
    )
    try:
        await acall(
            session.gateway_id,
            "chat.abort",
            params,
            user=user,
            wait=False,
            record={"with": "audit", "audit_id": str(event.pk)},
            notify={"group": session_group(session.pk), "type": "chat.abort_result"},
        )
    except (GatewayUnavailable, PermissionError) as exc:
        return cast(HttpResponse, await db(_abort_failed)(event, str(exc)))
    # The run's `aborted` event stores the partial reply and clears the run bar.
    return HttpResponse(status=204)


def _abort_failed(event: AuditEvent, error: str) -> HttpResponse:
    event.finish(False, error)
    html = render_to_string(
        f"{FRAGMENTS}#runbar",
        {"oob": True, "running": False, "notice": f"Could not stop the run: {error}"},
    )
    return HttpResponse(html)


# -- scroll back and search ---------------------------------------------------------------


@require_GET
def older(request: HttpRequest, pk: int) -> HttpResponse:
    session = session_for_user(request.user, pk)
    try:
        before_id = uuid.UUID(request.GET.get("before", ""))
    except ValueError:
        raise Http404("no such message") from None
    before = get_object_or_404(Message, session=session, pk=before_id)
    messages, more = reading.older_messages(session, before)
    return render(
        request,
        f"{FRAGMENTS}#older",
        {"messages": messages, "more": more, "session_pk": session.pk},
    )


@require_GET
def search(request: HttpRequest) -> HttpResponse:
    if not roles.can_view(request.user):
        raise PermissionDenied("viewer role needed")
    q = request.GET.get("q", "").strip()[:200]
    limit = reading.SEARCH_LIMIT
    results = list(reading.search_messages(q, limit)) if q else []
    agents = Agent.objects.filter(gateway__enabled=True, gone_at=None).select_related(
        "gateway"
    )[:50]
    return render(
        request,
        "chat/search.html",
        {
            "q": q,
            "results": results,
            "limit": limit,
            "agents": agents if roles.can_chat(request.user) else [],
        },
    )
