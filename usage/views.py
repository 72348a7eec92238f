from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from fleet import csvexport
from fleet.roles import can_view
from fleet.views import AuthenticatedHttpRequest
from usage import budgets, metrics, queries

TEMPLATE = "usage/usage.html"
TABLES = (
    ("agent", "By agent"),
    ("model", "By model"),
    ("gateway", "By gateway"),
    ("channel", "By channel"),
    ("person", "By person"),
)


def _require_viewer(request: AuthenticatedHttpRequest) -> None:
    if not can_view(request.user):
        raise PermissionDenied("Your account has no role yet: ask an admin for one.")


@require_GET
def usage_page(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Totals, the chart, the tables and the top sessions for the URL's filters. Bad
    filters answer 400 with the reason, and the form keeps what was typed."""
    _require_viewer(request)
    try:
        filters = queries.parse(request.GET)
    except queries.BadFilter as exc:
        return render(
            request,
            TEMPLATE,
            {
                "error": str(exc),
                "periods": queries.PERIODS,
                "gateways": queries.gateways(),
                "given": request.GET,
            },
            status=400,
        )
    report = queries.build(filters)
    context = {
        "report": report,
        "f": filters,
        "given": request.GET,
        "periods": queries.PERIODS,
        "stacks": queries.STACKS,
        "gateways": queries.gateways(),
        "choices": queries.choices(filters),
        "tables": [(name, title, report.by[name]) for name, title in TABLES],
        "budgets": budgets.states(),
        "chart": {"w": queries.CHART_W, "h": queries.CHART_H, "pad": queries.CHART_PAD},
        "csv_query": filters.query(),
    }
    template = TEMPLATE
    if request.htmx and not request.htmx.boosted:
        template += "#report"
    return render(request, template, context)


def _csv_lines(report: queries.Report) -> Iterator[str]:
    out = csvexport.writer()
    f = report.filters
    yield out.writerow(["period", f.start.isoformat(), f.end.isoformat()])
    yield out.writerow(
        ["table", "name", "runs", "input tokens", "output tokens", "cost (USD)"]
    )
    yield out.writerow(
        [
            "total",
            "Total",
            report.total.runs,
            report.total.input_tokens,
            report.total.output_tokens,
            report.total.cost,
        ]
    )
    for name, _title in TABLES:
        for row in report.by[name]:
            yield out.writerow(
                [
                    name,
                    csvexport.cell(row.label),
                    row.runs,
                    row.input_tokens,
                    row.output_tokens,
                    row.cost,
                ]
            )
    for row in report.top_sessions:
        yield out.writerow(
            [
                "session",
                csvexport.cell(row.label),
                row.runs,
                row.input_tokens,
                row.output_tokens,
                row.cost,
            ]
        )
    yield out.writerow(["day", *[csvexport.cell(s) for s in report.series]])
    for day, costs in zip(report.days, report.day_costs, strict=True):
        yield out.writerow([day.isoformat(), *costs])


@require_GET
def usage_csv(
    request: AuthenticatedHttpRequest,
) -> HttpResponse | StreamingHttpResponse:
    _require_viewer(request)
    try:
        filters = queries.parse(request.GET)
    except queries.BadFilter as exc:
        return HttpResponse(
            str(exc), status=400, content_type="text/plain; charset=utf-8"
        )
    report = queries.build(filters)
    response = StreamingHttpResponse(
        _csv_lines(report), content_type="text/csv; charset=utf-8"
    )
    response["Content-Disposition"] = (
        f'attachment; filename="usage-{filters.start.isoformat()}-{filters.end.isoformat()}.csv"'
    )
    return response


@login_not_required
@require_GET
def metrics_view(request: Any) -> HttpResponse:
    """Prometheus text format behind a bearer token (CONTROLCENTER_METRICS_TOKEN); without
    the variable the endpoint does not exist."""
    if not metrics.configured():
        raise Http404
    if not metrics.authorized(request.headers.get("Authorization", "")):
        response = HttpResponse(
            "A bearer token is required.\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = "Bearer"
        return response
    body, content_type = metrics.render()
    return HttpResponse(body, content_type=content_type)
