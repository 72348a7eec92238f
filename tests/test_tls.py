"""TLS towards a gateway: the simulator serves wss:// and https:// on loopback with
certificates this test makes (`cryptography`); the worker trusts a private CA named by a
path or an environment variable, refuses an unknown CA, honours a SHA-256 pin of the
certificate or of its public key, refuses a mismatch (state, words, no tight retry), and the
REST fallback over https:// does the same."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fleet.envrules import GatewayTls
from fleet.envrules import tls_context as gateway_tls_context
from fleet.gateway import (
    PinMismatch,
    RestClient,
    RestError,
    TlsConfigError,
    TlsSettings,
    fingerprints,
    format_fingerprint,
    normalize_pin,
    tls_context,
)
from fleet.gateway.testing import FakeGateway
from fleet.models import Gateway, Session
from tests.helpers import until_state, wait_for
from tests.tls_certs import Pki, make_pki

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "good", "gateway")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "other", "stranger")


@pytest.fixture
async def tls_sim(gateway_token: str, pki: Pki) -> AsyncIterator[FakeGateway]:
    sim = FakeGateway(
        token=gateway_token,
        agents=2,
        sessions=5,
        tls_certfile=str(pki.cert_pem),
        tls_keyfile=str(pki.key_pem),
    )
    await sim.start(host="127.0.0.1", port=0)
    try:
        yield sim
    finally:
        await sim.stop()


class CountingProxy:
    """A TCP relay in front of the simulator that counts the connections it is asked for
    (a refused TLS handshake never reaches the simulator's HTTP layer, so it cannot count)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(ConnectionError, OSError):
                dst.close()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()


# -- the pieces ------------------------------------------------------------------------------


def test_it_reads_pins_in_the_usual_notations(pki: Pki) -> None:
    cert_fp, spki_fp = fingerprints(pki.cert_der)
    assert normalize_pin(cert_fp.upper()) == cert_fp
    assert normalize_pin(format_fingerprint(cert_fp)) == cert_fp  # AB:CD:...
    assert normalize_pin("sha256:" + format_fingerprint(spki_fp)) == spki_fp
    b64 = base64.b64encode(bytes.fromhex(spki_fp)).decode()
    assert normalize_pin("sha256/" + b64) == spki_fp  # curl --pinnedpubkey, HPKP
    assert normalize_pin("  ") == ""
    for bad in ("abc", "zz" * 32, cert_fp[:-2]):
        with pytest.raises(TlsConfigError, match="SHA-256 fingerprint"):
            normalize_pin(bad)


def test_it_says_what_is_wrong_with_a_ca_setting(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(TlsConfigError, match="does not exist on the worker"):
        gateway_tls_context(GatewayTls(ca_file=str(tmp_path / "missing.pem")))
    monkeypatch.delenv("CC_TEST_GATEWAY_CA_BUNDLE", raising=False)
    with pytest.raises(TlsConfigError, match="CC_TEST_GATEWAY_CA_BUNDLE is not set"):
        gateway_tls_context(GatewayTls(ca_env="CC_TEST_GATEWAY_CA_BUNDLE"))
    monkeypatch.setenv(
        "CC_TEST_GATEWAY_CA_BUNDLE",
        "-----BEGIN CERTIFICATE-----\nnot pem\n-----END CERTIFICATE-----",
    )
    unusable = (
        "The variable CC_TEST_GATEWAY_CA_BUNDLE holds neither a PEM bundle nor a "
        "readable file."
    )
    with pytest.raises(TlsConfigError) as broken:
        gateway_tls_context(GatewayTls(ca_env="CC_TEST_GATEWAY_CA_BUNDLE"))
    assert str(broken.value) == unusable


@pytest.mark.parametrize("kind", ["a missing path", "an unreadable file", "any text"])
def test_it_never_quotes_what_a_ca_variable_holds(
    kind: str, tmp_path: Path, monkeypatch
) -> None:
    """Whatever the variable holds (read as a path when it is not PEM), the words name the
    variable only: neither the value nor a path taken from it reaches a message."""
    values = {
        "a missing path": str(tmp_path / "secret-dir" / "missing.pem"),
        "an unreadable file": str(tmp_path),  # a folder: not a readable CA file
        "any text": "sk-" + "q7Zr" * 8,
    }
    value = values[kind]
    monkeypatch.setenv("CC_TEST_GATEWAY_CA_BUNDLE", value)
    with pytest.raises(TlsConfigError) as refused:
        gateway_tls_context(GatewayTls(ca_env="CC_TEST_GATEWAY_CA_BUNDLE"))
    assert str(refused.value) == (
        "The variable CC_TEST_GATEWAY_CA_BUNDLE holds neither a PEM bundle nor a "
        "readable file."
    )
    assert value not in repr(refused.value) and str(tmp_path) not in str(refused.value)


def test_it_does_not_read_a_ca_variable_the_deployment_does_not_allow(
    monkeypatch,
) -> None:
    """The token's own variable (or any other secret) named as the CA: refused by name,
    before the variable is read (even when it holds usable PEM)."""
    monkeypatch.setenv(
        "CONTROLCENTER_TEST_GATEWAY_TOKEN", "-----BEGIN CERTIFICATE-----"
    )
    with pytest.raises(TlsConfigError) as refused:
        gateway_tls_context(GatewayTls(ca_env="CONTROLCENTER_TEST_GATEWAY_TOKEN"))
    assert "names ending in _CA_BUNDLE" in str(refused.value)
    assert "BEGIN" not in str(refused.value)


def test_it_trusts_a_ca_given_as_pem_text_without_quoting_it(pki: Pki) -> None:
    """The client library takes the bundle's text from its caller (it reads no
    environment); text that is no bundle is refused by the name the caller gave it."""
    context = tls_context(TlsSettings(ca_pem=pki.ca_pem.read_text(), ca_name="$MY_CA"))
    assert context.get_ca_certs()
    junk = (
        "-----BEGIN CERTIFICATE-----\nsk-" + "q7Zr" * 8 + "\n-----END CERTIFICATE-----"
    )
    with pytest.raises(TlsConfigError) as refused:
        tls_context(TlsSettings(ca_pem=junk, ca_name="$MY_CA"))
    assert str(refused.value) == "The CA bundle from $MY_CA is not a usable PEM bundle."
    assert "q7Zr" not in repr(refused.value)


# -- the worker over wss:// ------------------------------------------------------------------


async def _synced(gateway: Gateway, count: int = 5) -> None:
    async def enough() -> bool:
        return (
            await Session.objects.filter(gateway=gateway, gone_at=None).acount()
            >= count
        )

    await wait_for(enough, timeout=10)


async def test_it_connects_over_wss_trusting_a_ca_bundle_file(
    tls_sim, pki, make_gateway, running_worker
) -> None:
    assert tls_sim.url.startswith("wss://")
    gateway = await asyncio.to_thread(
        make_gateway, tls_sim.url, tls_ca_file=str(pki.ca_pem)
    )
    await running_worker()
    await until_state(gateway, Gateway.State.CONNECTED)
    await _synced(gateway)


async def test_it_trusts_a_ca_from_an_environment_variable_and_a_matching_pin(
    tls_sim, pki, make_gateway, running_worker, monkeypatch
) -> None:
    """The CA as PEM text in the environment; pinned to the certificate (hex with colons)
    on one gateway and to its public key (base64) on another: both connect."""
    monkeypatch.setenv("CC_TEST_GATEWAY_CA_BUNDLE", pki.ca_pem.read_text())
    cert_fp, spki_fp = fingerprints(pki.cert_der)
    by_cert = await asyncio.to_thread(
        make_gateway,
        tls_sim.url,
        tls_ca_env="CC_TEST_GATEWAY_CA_BUNDLE",
        tls_pin=format_fingerprint(cert_fp),
    )
    by_key = await asyncio.to_thread(
        make_gateway,
        tls_sim.url.replace("wss://", "https://"),  # an https:// URL works the same
        tls_ca_env="CC_TEST_GATEWAY_CA_BUNDLE",
        tls_pin="sha256/" + base64.b64encode(bytes.fromhex(spki_fp)).decode(),
    )
    await running_worker()
    await until_state(by_cert, Gateway.State.CONNECTED)
    await until_state(by_key, Gateway.State.CONNECTED)
    await _synced(by_cert)


async def test_it_uses_the_system_trust_store_when_no_bundle_is_named(
    tls_sim, pki, make_gateway, running_worker, monkeypatch
) -> None:
    """Blank TLS fields: OpenSSL's default verify paths (the system store). SSL_CERT_FILE
    points those at the test's CA, as an operator's system store would hold a public CA."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_pem))
    gateway = await asyncio.to_thread(make_gateway, tls_sim.url)
    await running_worker()
    await until_state(gateway, Gateway.State.CONNECTED)


@pytest.mark.parametrize("trust", ["system store", "another CA"])
async def test_it_refuses_a_certificate_from_an_unknown_ca(
    trust, tls_sim, other_pki, make_gateway, running_worker
) -> None:
    fields: dict[str, Any] = (
        {"tls_ca_file": str(other_pki.ca_pem)} if trust == "another CA" else {}
    )
    gateway = await asyncio.to_thread(make_gateway, tls_sim.url, **fields)
    await running_worker()
    refused = await until_state(gateway, Gateway.State.TLS_FAILED)
    assert "certificate was refused" in refused.last_error
    assert "unable to get local issuer certificate" in refused.last_error
    assert "CA bundle" in refused.last_error  # says what to configure
    assert tls_sim.clients == 0 and not tls_sim.calls  # no connect frame, no token


async def test_it_refuses_a_pin_mismatch_says_both_fingerprints_and_does_not_hammer(
    tls_sim, pki, make_gateway, running_worker, gateway_token
) -> None:
    proxy = CountingProxy(tls_sim.port)
    port = await proxy.start()
    cert_fp, spki_fp = fingerprints(pki.cert_der)
    wrong = "ab" * 32
    try:
        gateway = await asyncio.to_thread(
            make_gateway,
            f"wss://127.0.0.1:{port}",
            tls_ca_file=str(pki.ca_pem),  # the CA trusts it: only the pin refuses it
            tls_pin=wrong,
        )
        await running_worker()
        refused = await until_state(gateway, Gateway.State.TLS_FAILED)
        message = refused.last_error
        assert "TLS pin mismatch" in message
        assert format_fingerprint(wrong) in message  # expected
        assert format_fingerprint(cert_fp) in message  # seen: the certificate ...
        assert format_fingerprint(spki_fp) in message  # ... and its public key
        # Several ready-timeouts (1 s here) and backoff periods later: still one attempt,
        # no REST fallback started, nothing reached the simulator.
        await asyncio.sleep(3.5)
        assert proxy.connections == 1
        current = await Gateway.objects.aget(pk=gateway.pk)
        assert current.state == Gateway.State.TLS_FAILED
        assert not tls_sim.calls and not tls_sim.http_calls
    finally:
        await proxy.stop()


# -- the REST fallback over https:// ---------------------------------------------------------


async def test_the_rest_fallback_over_https_uses_the_same_trust_and_pin(
    tls_sim, pki, make_gateway, running_worker
) -> None:
    tls_sim.ws_enabled = False  # upgrades get 503: the worker falls back to REST
    cert_fp, _ = fingerprints(pki.cert_der)
    gateway = await asyncio.to_thread(
        make_gateway, tls_sim.url, tls_ca_file=str(pki.ca_pem), tls_pin=cert_fp
    )
    await running_worker()
    await until_state(gateway, Gateway.State.REST_FALLBACK, timeout=15)
    await _synced(gateway)
    assert ("POST", "/tools/invoke") in tls_sim.http_calls


async def test_the_rest_fallback_refuses_an_untrusted_certificate_and_stops_polling(
    tls_sim, pki, other_pki, make_gateway, running_worker, gateway_token
) -> None:
    """The WebSocket is trusted but not ready (503); the REST side answers from a server
    whose certificate the gateway's CA did not sign: tls_failed, no request, no loop."""
    tls_sim.ws_enabled = False
    stranger = FakeGateway(
        token=gateway_token,
        tls_certfile=str(other_pki.cert_pem),
        tls_keyfile=str(other_pki.key_pem),
    )
    await stranger.start(host="127.0.0.1", port=0)
    proxy = CountingProxy(stranger.port)
    port = await proxy.start()
    try:
        gateway = await asyncio.to_thread(
            make_gateway,
            tls_sim.url,
            rest_url=f"https://127.0.0.1:{port}",
            tls_ca_file=str(pki.ca_pem),
        )
        await running_worker()
        refused = await until_state(gateway, Gateway.State.TLS_FAILED, timeout=15)
        assert refused.last_error.startswith("REST fallback: ")
        assert "unable to get local issuer certificate" in refused.last_error
        await asyncio.sleep(2)  # several poll intervals (0.3 s here)
        assert proxy.connections == 1 and not stranger.http_calls
        current = await Gateway.objects.aget(pk=gateway.pk)
        assert current.state == Gateway.State.TLS_FAILED
    finally:
        await proxy.stop()
        await stranger.stop()


async def test_the_rest_client_refuses_a_pin_mismatch_before_sending_the_token(
    tls_sim, pki, gateway_token
) -> None:
    context = tls_context(TlsSettings(ca_file=str(pki.ca_pem), pin="cd" * 32))
    client = RestClient(tls_sim.http_url, gateway_token, verify=context)
    try:
        with pytest.raises(RestError) as refused:
            await client.invoke("sessions_list")
    finally:
        await client.aclose()
    assert isinstance(refused.value.tls, PinMismatch)
    assert "TLS pin mismatch" in str(refused.value)
    assert gateway_token not in str(refused.value)
    assert not tls_sim.http_calls  # the request (and its Bearer token) never went out
    # The same client settings with the right pin do reach it.
    good = RestClient(
        tls_sim.http_url,
        gateway_token,
        verify=tls_context(
            TlsSettings(ca_file=str(pki.ca_pem), pin=fingerprints(pki.cert_der)[1])
        ),
    )
    try:
        assert (await good.readyz())["ready"] is True
    finally:
        await good.aclose()


async def test_it_explains_an_unusable_tls_setting(
    tls_sim, make_gateway, running_worker, monkeypatch
) -> None:
    monkeypatch.delenv("CC_TEST_GATEWAY_CA_BUNDLE", raising=False)
    gateway = await asyncio.to_thread(
        make_gateway, tls_sim.url, tls_ca_env="CC_TEST_GATEWAY_CA_BUNDLE"
    )
    await running_worker()
    refused = await until_state(gateway, Gateway.State.TLS_FAILED)
    assert "CC_TEST_GATEWAY_CA_BUNDLE is not set" in refused.last_error
