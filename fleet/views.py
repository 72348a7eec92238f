from __future__ import annotations

from django.contrib.auth.decorators import login_not_required
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from fleet.models import Gateway


@login_not_required
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up, the database answers, and each gateway's state (no secrets)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        gateways = [
            {
                "name": g.name,
                "state": g.state,
                "protocol": g.protocol,
                "version": g.server_version,
                "since": g.state_changed_at.isoformat(),
                "worker": g.worker_alive(),
            }
            for g in Gateway.objects.order_by("name")
        ]
    except Exception as exc:  # noqa: BLE001 - report, don't crash the health check
        return JsonResponse(
            {"ok": False, "database": f"error: {exc.__class__.__name__}"}, status=503
        )
    return JsonResponse({"ok": True, "database": "ok", "gateways": gateways})
