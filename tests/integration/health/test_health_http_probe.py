"""HTTP readiness probes against a real aiohttp server on loopback; assertions are made on the server side."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers.net import free_port
from vm_agent.config.probe import HttpGetAction
from vm_agent.health import probe_once

pytestmark = pytest.mark.integration


@dataclass
class Seen:
    path: str
    query: str
    headers: list[tuple[str, str]]
    peer: str


@dataclass
class App:
    port: int
    seen: list[Seen] = field(default_factory=list)

    def header(self, i: int, name: str) -> list[str]:
        return [v for k, v in self.seen[i].headers if k.lower() == name.lower()]


def build_app(app_state: App) -> web.Application:
    async def record(request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername")[0] if request.transport else ""
        app_state.seen.append(Seen(request.path, request.query_string, list(request.headers.items()), peer))

    async def handler(request: web.Request) -> web.StreamResponse:
        await record(request)
        name = request.match_info["name"]
        if name == "ok":
            return web.Response(text="ok")
        if name == "slow":
            await asyncio.sleep(2.5)
            return web.Response(text="late")
        if name.startswith("code"):
            return web.Response(status=int(name[4:]))
        if name == "to-ok":
            raise web.HTTPFound("/ok")
        if name == "to-500":
            raise web.HTTPTemporaryRedirect("/code500")
        if name == "to-abs":
            raise web.HTTPMovedPermanently(f"http://127.0.0.1:{app_state.port}/ok")
        if name == "loop":
            raise web.HTTPFound("/loop")
        return web.Response(status=404)

    application = web.Application()
    application.router.add_get("/{name}", handler)
    return application


async def serve(app_state: App, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(build_app(app_state))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", app_state.port, ssl_context=ssl_context).start()
    return runner


@pytest.fixture
async def app() -> AsyncIterator[App]:
    state = App(port=free_port())
    runner = await serve(state)
    try:
        yield state
    finally:
        await runner.cleanup()


async def probe(action: HttpGetAction, timeout: float = 2.0, source: str | None = None) -> tuple[bool, str]:
    return await probe_once(action, default_host="127.0.0.1", timeout=timeout, source_address=source)


async def test_200_is_healthy_with_path_query_and_default_user_agent(app: App) -> None:
    assert await probe(HttpGetAction(port=app.port, path="/ok?depth=full&x=1")) == (True, "")
    assert len(app.seen) == 1
    assert app.seen[0].path == "/ok"
    assert app.seen[0].query == "depth=full&x=1"
    assert app.header(0, "User-Agent") == ["istio-probe/1.0"]
    assert app.header(0, "Host") == [f"127.0.0.1:{app.port}"]
    assert app.header(0, "Connection") == ["close"]  # keep-alives off


async def test_5xx_and_4xx_are_unhealthy_with_istios_message(app: App) -> None:
    assert await probe(HttpGetAction(port=app.port, path="/code500")) == (
        False,
        "status code was not from [200,400), bad code 500",
    )
    assert await probe(HttpGetAction(port=app.port, path="/code400")) == (
        False,
        "status code was not from [200,400), bad code 400",
    )
    assert await probe(HttpGetAction(port=app.port, path="/code399")) == (True, "")


async def test_3xx_without_location_is_healthy(app: App) -> None:
    assert await probe(HttpGetAction(port=app.port, path="/code300")) == (True, "")
    assert await probe(HttpGetAction(port=app.port, path="/code304")) == (True, "")


async def test_redirects_are_followed(app: App) -> None:
    assert await probe(HttpGetAction(port=app.port, path="/to-ok")) == (True, "")
    assert [s.path for s in app.seen] == ["/to-ok", "/ok"]
    app.seen.clear()
    # A redirect to a failing page is judged by the final answer, not the 3xx.
    assert await probe(HttpGetAction(port=app.port, path="/to-500")) == (
        False,
        "status code was not from [200,400), bad code 500",
    )
    assert [s.path for s in app.seen] == ["/to-500", "/code500"]


async def test_redirect_loop_stops_after_ten(app: App) -> None:
    ok, message = await probe(HttpGetAction(port=app.port, path="/loop"))
    assert not ok
    assert message == f'Get "http://127.0.0.1:{app.port}/loop": stopped after 10 redirects'
    assert len(app.seen) == 11


async def test_headers_and_host_are_sent(app: App) -> None:
    action = HttpGetAction(
        port=app.port,
        path="/ok",
        headers=(("X-Probe", "one"), ("X-Probe", "two"), ("Host", "reviews.default.svc"), ("User-Agent", "mine/2")),
    )
    assert await probe(action) == (True, "")
    assert app.header(0, "X-Probe") == ["one", "two"]
    assert app.header(0, "Host") == ["reviews.default.svc"]
    assert app.header(0, "User-Agent") == ["mine/2"]


async def test_host_header_survives_relative_redirect_not_absolute(app: App) -> None:
    assert await probe(HttpGetAction(port=app.port, path="/to-ok", headers=(("Host", "app.local"),))) == (True, "")
    assert [app.header(i, "Host") for i in range(2)] == [["app.local"], ["app.local"]]
    app.seen.clear()
    assert await probe(HttpGetAction(port=app.port, path="/to-abs", headers=(("Host", "app.local"),))) == (True, "")
    assert [app.header(i, "Host") for i in range(2)] == [["app.local"], [f"127.0.0.1:{app.port}"]]


async def test_slower_than_timeout_is_unhealthy_quickly(app: App) -> None:
    started = time.monotonic()
    ok, message = await probe(HttpGetAction(port=app.port, path="/slow"), timeout=0.5)
    elapsed = time.monotonic() - started
    assert not ok
    assert message == (
        f'Get "http://127.0.0.1:{app.port}/slow": context deadline exceeded '
        "(Client.Timeout exceeded while awaiting headers)"
    )
    assert elapsed < 2.0  # gave up at the timeout, not when the server answered


async def test_connection_refused() -> None:
    port = free_port()
    ok, message = await probe(HttpGetAction(port=port, path="/ok"))
    assert not ok
    assert message == f'Get "http://127.0.0.1:{port}/ok": dial tcp 127.0.0.1:{port}: connect: connection refused'


async def test_unparsable_path_fails_every_round_without_a_request(app: App) -> None:
    ok, message = await probe(HttpGetAction(port=app.port, path="/ok%zz"))
    assert (ok, message) == (False, 'parse "/ok%zz": invalid URL escape "%zz"')
    assert app.seen == []


async def test_host_field_overrides_default_host(app: App) -> None:
    # The default host refuses; the probe's own host answers.
    action = HttpGetAction(port=app.port, path="/ok", host="127.0.0.1")
    assert await probe_once(action, default_host="127.0.0.9", timeout=2, source_address=None) == (True, "")
    ok, message = await probe_once(
        HttpGetAction(port=app.port, path="/ok"), default_host="127.0.0.9", timeout=2, source_address=None
    )
    assert not ok
    assert "127.0.0.9" in message


async def test_probe_leaves_from_source_address(app: App) -> None:
    assert await probe(HttpGetAction(port=app.port, path="/ok"), source="127.0.0.6") == (True, "")
    assert await probe(HttpGetAction(port=app.port, path="/ok"), source=None) == (True, "")
    assert [s.peer for s in app.seen] == ["127.0.0.6", "127.0.0.1"]


def self_signed(tmp: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app.invalid")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ctx


async def test_https_with_self_signed_cert_is_not_verified(tmp_path: Path) -> None:
    state = App(port=free_port())
    runner = await serve(state, self_signed(tmp_path))
    try:
        assert await probe(HttpGetAction(port=state.port, path="/ok", scheme="https")) == (True, "")
        assert await probe(HttpGetAction(port=state.port, path="/code503", scheme="https")) == (
            False,
            "status code was not from [200,400), bad code 503",
        )
    finally:
        await runner.cleanup()
    assert [s.path for s in state.seen] == ["/ok", "/code503"]
