"""What the worker proves itself with towards a gateway: the shared token (from the
worker's environment, never stored), the device key kept per gateway, and the device token
the gateway issued to it."""

from __future__ import annotations

from collections.abc import Iterable

from django.db import transaction
from django.utils import timezone

from fleet import envrules
from fleet.gateway import DeviceKey
from fleet.models import DeviceIdentity, Gateway


def gateway_token(gateway: Gateway) -> str:
    """The shared token, read from the worker's environment (never stored)."""
    return envrules.read_env(gateway.token_env, envrules.TOKEN)


def device_key_for(gateway_id: int) -> tuple[DeviceKey, str]:
    """This gateway's device key (made on first use) and the device token it issued us."""
    identity = DeviceIdentity.objects.filter(gateway_id=gateway_id).first()
    if identity is None:
        key = DeviceKey.generate()
        identity, _ = DeviceIdentity.objects.get_or_create(
            gateway_id=gateway_id,
            defaults={
                "private_key_pem": key.to_pem(),
                "device_id": key.device_id,
                "public_key": key.public_key_b64url,
            },
        )
    return DeviceKey.from_pem(identity.private_key_pem), identity.device_token


def rotate_device_identity(gateway_id: int) -> tuple[str, str]:
    """A new Ed25519 key for this gateway, the old key and its device token forgotten;
    the worker sees `identity_rotated_at` change and reconnects with the new key (off
    loopback the gateway then asks for pairing again). Returns (old, new) device ids."""
    key = DeviceKey.generate()
    with transaction.atomic():
        gateway = Gateway.objects.select_for_update().get(pk=gateway_id)
        old = DeviceIdentity.objects.filter(gateway=gateway).first()
        old_id = old.device_id if old is not None else ""
        DeviceIdentity.objects.update_or_create(
            gateway=gateway,
            defaults={
                "private_key_pem": key.to_pem(),
                "device_id": key.device_id,
                "public_key": key.public_key_b64url,
                "device_token": "",
                "device_token_scopes": [],
            },
        )
        gateway.identity_rotated_at = timezone.now()
        gateway.save(update_fields=["identity_rotated_at", "updated_at"])
    return old_id, key.device_id


def store_device_token(gateway_id: int, token: str, scopes: Iterable[str] = ()) -> None:
    DeviceIdentity.objects.filter(gateway_id=gateway_id).update(
        device_token=token, device_token_scopes=list(scopes)
    )
