"""TLS towards one gateway: the trust (the system store, or a CA bundle named per gateway)
and an optional SHA-256 pin of the gateway's certificate or of its public key.

The pin is checked inside the TLS handshake itself: `tls_context()` returns a context whose
SSL objects compare the peer's certificate with the pin as soon as the handshake completes,
before a single byte of HTTP or WebSocket goes out. So neither the WebSocket client nor the
REST fallback (httpx) can send the gateway token to a server that fails the pin; both simply
see the handshake fail with `PinMismatch`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

PEM_MARKER = "-----BEGIN CERTIFICATE-----"
# The last sentence of `tls_failure_text`, unless the caller words it for its own settings.
CA_ADVICE = (
    "For a self-signed or private CA, give its CA bundle (a file or its PEM text)."
)


class TlsConfigError(ValueError):
    """The gateway's TLS settings cannot be used (a missing bundle, a malformed pin)."""


class PinMismatch(ssl.SSLCertVerificationError):
    """The gateway's certificate is trusted (or not checked yet) but does not match the pin."""

    def __init__(self, expected: str, cert_sha256: str, spki_sha256: str) -> None:
        self.expected = expected
        self.cert_sha256 = cert_sha256
        self.spki_sha256 = spki_sha256
        self.message = (
            f"TLS pin mismatch: expected SHA-256 {format_fingerprint(expected)}, the gateway "
            f"presented a certificate with SHA-256 {format_fingerprint(cert_sha256) or 'none'} "
            f"(public key SHA-256 {format_fingerprint(spki_sha256) or 'none'})"
        )
        super().__init__(self.message)
        self.verify_message = self.message

    def __str__(self) -> str:
        return self.message


def format_fingerprint(hex_digest: str) -> str:
    """AB:CD:... (upper-case pairs), the way browsers and `openssl x509 -fingerprint` show it."""
    value = hex_digest.upper()
    return ":".join(value[i : i + 2] for i in range(0, len(value), 2))


def normalize_pin(text: str) -> str:
    """A pin as typed → 64 lower-case hex digits. Accepted: hex with or without colons or
    spaces (optionally prefixed `sha256:` / `sha256/`), or base64 of the 32-byte digest (the
    `sha256/...` form of HPKP and curl's --pinnedpubkey). Blank stays blank."""
    value = text.strip()
    if not value:
        return ""
    lowered = value.lower()
    for prefix in ("sha256:", "sha256/", "sha-256:"):
        if lowered.startswith(prefix):
            value = value[len(prefix) :].strip()
            break
    compact = "".join(c for c in value if c not in ": \t")
    if len(compact) == 64 and all(c in "0123456789abcdefABCDEF" for c in compact):
        return compact.lower()
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return raw.hex()
    raise TlsConfigError(
        "A pin is the SHA-256 fingerprint of the gateway's certificate or of its public key: "
        "64 hex digits (colons allowed) or 44 characters of base64."
    )


def fingerprints(der: bytes) -> tuple[str, str]:
    """(SHA-256 of the DER certificate, SHA-256 of its SubjectPublicKeyInfo), as hex."""
    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest(), hashlib.sha256(spki).hexdigest()


def check_pin(der: bytes | None, pin: str) -> None:
    """Raise PinMismatch unless the certificate's or its public key's SHA-256 equals pin."""
    if not pin:
        return
    if not der:
        raise PinMismatch(pin, "", "")
    cert_fp, spki_fp = fingerprints(der)
    if pin not in (cert_fp, spki_fp):
        raise PinMismatch(pin, cert_fp, spki_fp)


class _PinnedSSLObject(ssl.SSLObject):
    """Checks the pin the moment the handshake completes (asyncio and anyio both drive TLS
    through SSLObject.do_handshake, so this covers websockets and httpx alike)."""

    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantReadError until the handshake is done
        pin = getattr(self.context, "pin", "")
        if pin:
            check_pin(self.getpeercert(binary_form=True), pin)


class PinnedSSLContext(ssl.SSLContext):
    sslobject_class = _PinnedSSLObject
    pin: str = ""


@dataclass(frozen=True)
class TlsSettings:
    """One gateway's TLS settings: whom to trust (a CA bundle file, a CA bundle's PEM text
    the caller has read from wherever it keeps it, or else the system store) and a pin."""

    ca_file: str = ""  # a PEM bundle on this machine's disk
    ca_pem: str = ""  # or the bundle's PEM text itself
    pin: str = ""  # as typed; normalised when the context is made
    # How messages name where `ca_pem` comes from (e.g. "$MY_CA_BUNDLE"); never the text.
    ca_name: str = ""

    @property
    def custom(self) -> bool:
        return bool(self.ca_file or self.ca_pem or self.ca_name or self.pin)

    def describe(self) -> str:
        """In words, for messages and logs (no file contents, no secrets)."""
        trust = (
            f"CA bundle {self.ca_file}"
            if self.ca_file
            else f"CA bundle from {self.ca_name or 'PEM text'}"
            if self.ca_pem or self.ca_name
            else "the system trust store"
        )
        return trust + (
            f", pinned to SHA-256 {format_fingerprint(normalize_pin(self.pin))}"
            if self.pin
            else ""
        )


def tls_context(settings: TlsSettings) -> PinnedSSLContext:
    """A client context: certificate and host name checked against the system store or the
    given bundle, plus the pin. Raises TlsConfigError when a setting cannot be used (the
    words never quote `ca_pem`)."""
    context = PinnedSSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.pin = normalize_pin(settings.pin)
    if settings.ca_file:
        _load_file(context, settings.ca_file, "the CA bundle")
    elif settings.ca_pem:
        try:
            context.load_verify_locations(cadata=settings.ca_pem)
        except (ssl.SSLError, ValueError):
            raise TlsConfigError(
                f"The CA bundle from {settings.ca_name or 'PEM text'} is not a usable "
                "PEM bundle."
            ) from None
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def _load_file(context: ssl.SSLContext, path: str, what: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise TlsConfigError(f"{what} {path} does not exist.") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsConfigError(f"{what} {path} cannot be read: {exc}") from None


def find_tls_failure(exc: BaseException | None) -> ssl.SSLError | None:
    """The TLS verification error behind an exception (httpx wraps it as its cause)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLCertVerificationError | PinMismatch):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def tls_failure_text(
    exc: ssl.SSLError,
    settings: TlsSettings | None = None,
    *,
    advice: str = CA_ADVICE,
) -> str:
    """Plain words for a refused certificate, naming what to change (`advice`: how the
    caller's users name a CA bundle)."""
    if isinstance(exc, PinMismatch):
        return (
            f"{exc}. The connection was refused before anything was sent. If the gateway's "
            "certificate was renewed on purpose, put the new fingerprint in the gateway's "
            "TLS pin; otherwise something else answers at this address."
        )
    reason: Any = getattr(exc, "verify_message", "") or exc.reason or str(exc)
    trust = settings.describe() if settings is not None else "the system trust store"
    return (
        f"The gateway's TLS certificate was refused ({reason}); trusted: {trust}. "
        + advice
    )
