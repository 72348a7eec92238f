"""The Ed25519 device identity the gateway asks of operator clients.

device.id is the SHA-256 hex of the raw public key, publicKey its base64url (no padding),
and the signature is Ed25519 over the UTF-8 "v3" payload:
    v3|deviceId|clientId|clientMode|role|scopes,joined|signedAt|token|nonce|platform|deviceFamily
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def device_id_for(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()


def signature_payload(
    *,
    device_id: str,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: list[str] | tuple[str, ...],
    signed_at: int,
    token: str,
    nonce: str,
    platform: str = "",
    device_family: str = "",
) -> bytes:
    return "|".join(
        [
            "v3",
            device_id,
            client_id,
            client_mode,
            role,
            ",".join(scopes),
            str(signed_at),
            token or "",
            nonce,
            platform.strip().lower(),
            device_family.strip().lower(),
        ]
    ).encode()


@dataclass(frozen=True)
class DeviceKey:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: str) -> DeviceKey:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the stored device key is not an Ed25519 key")
        return cls(key)

    def to_pem(self) -> str:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()

    @property
    def raw_public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def device_id(self) -> str:
        return device_id_for(self.raw_public_key)

    @property
    def public_key_b64url(self) -> str:
        return b64url(self.raw_public_key)

    @property
    def fingerprint(self) -> str:
        """A short, human-comparable SHA-256 fingerprint of the public key."""
        digest = hashlib.sha256(self.raw_public_key).hexdigest()
        return ":".join(digest[i : i + 2] for i in range(0, 32, 2))

    def sign_connect(
        self,
        *,
        client_id: str,
        client_mode: str,
        role: str,
        scopes: list[str] | tuple[str, ...],
        signed_at: int,
        token: str,
        nonce: str,
        platform: str = "",
        device_family: str = "",
    ) -> dict[str, Any]:
        payload = signature_payload(
            device_id=self.device_id,
            client_id=client_id,
            client_mode=client_mode,
            role=role,
            scopes=scopes,
            signed_at=signed_at,
            token=token,
            nonce=nonce,
            platform=platform,
            device_family=device_family,
        )
        return {
            "id": self.device_id,
            "publicKey": self.public_key_b64url,
            "signature": b64url(self.private_key.sign(payload)),
            "signedAt": signed_at,
            "nonce": nonce,
        }


def verify_device_signature(
    device: dict[str, Any],
    *,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: list[str],
    token: str,
    platform: str = "",
    device_family: str = "",
) -> bool:
    """The gateway's side of the check (used by the simulator): the id matches the key and
    the signature covers the payload."""
    try:
        raw = b64url_decode(str(device["publicKey"]))
        if device_id_for(raw) != device.get("id"):
            return False
        key = Ed25519PublicKey.from_public_bytes(raw)
        payload = signature_payload(
            device_id=str(device["id"]),
            client_id=client_id,
            client_mode=client_mode,
            role=role,
            scopes=scopes,
            signed_at=int(device["signedAt"]),
            token=token,
            nonce=str(device["nonce"]),
            platform=platform,
            device_family=device_family,
        )
        key.verify(b64url_decode(str(device["signature"])), payload)
    except (KeyError, ValueError, TypeError, InvalidSignature):
        return False
    return True
