"""vm_agent.http11 over real loopback sockets: the server against raw requests, the client against raw answers."""

from __future__ import annotations

import asyncio
import errno
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.helpers.net import free_port
from vm_agent.http11 import ConnectError, HttpError, Request, Response, fetch, start_server
from vm_agent.http11.server import HttpServer


async def echo(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    body = f"{request.method} {request.path} q={request.query} peer={request.peer} body={request.body.decode()}"
    return Response.text(body + f" x={request.headers.get('x-thing')}")


@pytest.fixture
async def server() -> AsyncIterator[tuple[HttpServer, int]]:
    srv = await start_server(echo, "127.0.0.1", 0)
    try:
        yield srv, int(srv.sockets[0].getsockname()[1])
    finally:
        await srv.close()


async def exchange(port: int, raw: bytes, *, reads: int = 1) -> bytes:
    """Send raw bytes, read until the server closes or ``reads`` complete responses arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = b""
    try:
        async with asyncio.timeout(5):
            while data.count(b"HTTP/1.1 ") < reads or not _complete(data):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
    finally:
        writer.close()
    return data


def _complete(data: bytes) -> bool:
    head, sep, body = data.rpartition(b"\r\n\r\n")
    if not sep:
        return False
    length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return bool(length) and len(body) >= int(length[-1].split(b":")[1])


async def test_keep_alive_serves_two_requests_on_one_connection(server: tuple[HttpServer, int]) -> None:
    _, port = server
    raw = b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nX-Thing: one\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    data = await exchange(port, raw, reads=2)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b"GET /a q=x=1 peer=127.0.0.1 body= x=one" in data
    assert b"GET /b q= peer=127.0.0.1 body= x=None" in data
    assert b"Content-Type: text/plain; charset=utf-8" in data


async def test_head_has_length_but_no_body_and_close_is_honoured(server: tuple[HttpServer, int]) -> None:
    _, port = server
    data = await exchange(port, b"HEAD /x HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: " in head and b"Connection: close" in head
    assert body == b""


async def test_request_bodies_by_length_and_chunked(server: tuple[HttpServer, int]) -> None:
    _, port = server
    data = await exchange(port, b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert b"POST /p q= peer=127.0.0.1 body=hello" in data
    chunked = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"
    assert b"body=abcde" in await exchange(port, chunked)


async def test_http10_closes_after_the_answer(server: tuple[HttpServer, int]) -> None:
    _, port = server
    data = await exchange(port, b"GET /old HTTP/1.0\r\n\r\n", reads=2)  # would hang if the server kept it open
    assert data.count(b"HTTP/1.1 200 OK") == 1 and b"Connection: close" in data


@pytest.mark.parametrize(
    "raw",
    [
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    ],
    ids=["request-line", "version", "header", "length", "too-long"],
)
async def test_malformed_requests_get_400_and_the_connection_ends(server: tuple[HttpServer, int], raw: bytes) -> None:
    _, port = server
    data = await exchange(port, raw, reads=2)
    assert data.startswith(b"HTTP/1.1 400 Bad Request")
    assert data.count(b"HTTP/1.1 ") == 1


async def test_a_handler_bug_is_a_500_and_the_server_keeps_serving(server: tuple[HttpServer, int]) -> None:
    _, port = server
    assert (await exchange(port, b"GET /boom HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500 Internal Server Error")
    assert (await exchange(port, b"GET /fine HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")


async def test_close_ends_idle_keep_alive_connections(server: tuple[HttpServer, int]) -> None:
    srv, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    await reader.readuntil(b"body= x=None")
    await srv.close()
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed by the server, not left to the keep-alive timeout
    writer.close()


def test_gzipped_body_decompresses_to_the_original() -> None:
    response = Response.text("metric 1\n" * 1000).gzipped()
    assert ("Content-Encoding", "gzip") in response.headers
    assert gzip.decompress(response.body) == b"metric 1\n" * 1000
    assert len(response.body) < 1000


async def raw_server(answer: bytes, *, close: bool = True) -> tuple[asyncio.Server, int, list[bytes]]:
    """A server that records the request head and answers with fixed bytes."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        if close:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, int(srv.sockets[0].getsockname()[1]), seen


async def with_raw(answer: bytes, call: Callable[[int], Awaitable[object]]) -> tuple[object, list[bytes]]:
    srv, port, seen = await raw_server(answer)
    try:
        return await call(port), seen
    finally:
        srv.close()


async def test_client_reads_length_chunked_and_until_eof_bodies() -> None:
    bodies = {
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloIGNORED": b"hello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n": b"hello world",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end": b"until the end",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno": b"no",
    }
    for answer, body in bodies.items():
        reply, seen = await with_raw(answer, lambda port: fetch("GET", "127.0.0.1", port, "/stats?usedonly"))
        assert reply.body == body  # type: ignore[attr-defined]
        assert seen[0].startswith(b"GET /stats?usedonly HTTP/1.1\r\n")
        assert b"Connection: close" in seen[0]
    reply, _ = await with_raw(next(iter(bodies)), lambda port: fetch("GET", "127.0.0.1", port, "/"))
    assert reply.status == 200  # type: ignore[attr-defined]


async def test_client_sends_host_override_and_headers_in_order() -> None:
    answer = b"HTTP/1.1 302 Found\r\nLocation: /next\r\nContent-Length: 0\r\n\r\n"

    async def call(port: int) -> object:
        return await fetch("GET", "127.0.0.1", port, "/", headers=[("Host", "app.local"), ("A", "1"), ("A", "2")])

    reply, seen = await with_raw(answer, call)
    assert reply.headers.get("location") == "/next"  # type: ignore[attr-defined]
    assert b"Host: app.local\r\nA: 1\r\nA: 2\r\n" in seen[0]
    assert seen[0].count(b"Host:") == 1


async def test_client_errors_say_what_went_wrong() -> None:
    with pytest.raises(HttpError, match="malformed HTTP response"):
        await with_raw(b"SSH-2.0-OpenSSH\r\n\r\n", lambda port: fetch("GET", "127.0.0.1", port, "/"))
    with pytest.raises(asyncio.IncompleteReadError):
        await with_raw(b"", lambda port: fetch("GET", "127.0.0.1", port, "/"))
    with pytest.raises(ConnectError) as refused:
        await fetch("GET", "127.0.0.1", free_port(), "/")
    assert refused.value.os_error.errno == errno.ECONNREFUSED
