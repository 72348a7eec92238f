"""The gateway named by the environment (OPENCLAW_GATEWAY_URL), created or re-pointed when
the worker or `serve` starts."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from django.conf import settings

from fleet import envrules
from fleet.models import Gateway

log = logging.getLogger(__name__)


def ensure_env_gateway() -> Gateway | None:
    """The gateway named by OPENCLAW_GATEWAY_URL, created (or re-pointed) on start."""
    url = settings.OPENCLAW_GATEWAY_URL
    if not url:
        return None
    for value, name in (
        (url, "OPENCLAW_GATEWAY_URL"),
        (settings.GATEWAY_REST_URL, "GATEWAY_REST_URL"),
    ):
        why = envrules.url_shape_refusal(value, name) if value else ""
        if why:
            # Not stored: the database would keep the password. (A plain ws:// address
            # off loopback is stored; the worker refuses it and the fleet page says why.)
            log.error("The gateway from the environment was not added: %s", why)
            return None
    existing = Gateway.objects.filter(url=url).first()
    if existing is not None:
        if settings.GATEWAY_REST_URL and existing.rest_url != settings.GATEWAY_REST_URL:
            existing.rest_url = settings.GATEWAY_REST_URL
            existing.save(update_fields=["rest_url", "updated_at"])
        return existing
    host = urlsplit(url).hostname or "gateway"
    name = host if not Gateway.objects.filter(name=host).exists() else url
    return Gateway.objects.create(
        name=name[:100],
        url=url,
        rest_url=settings.GATEWAY_REST_URL,
        token_env="OPENCLAW_GATEWAY_TOKEN",
    )
