"""A small HTTP/1.1 server for the agent's status endpoints: one handler coroutine, keep-alive, no framework.

The status server answers a handful of short requests (readiness every few seconds, a metrics scrape,
debug JSON), so the whole request body is read before the handler runs and every response carries a
Content-Length. Slow or idle clients are cut off by timeouts instead of holding a task forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from vm_agent.http11.message import MAX_HEAD_BYTES, Headers, HttpError, read_body, read_head, render_head
from vm_agent.logs import get_logger

log = get_logger("http")

MAX_REQUEST_BODY = 1024 * 1024
HEAD_TIMEOUT_S = 10.0
"""A client has this long to send a request's head and body once it started one."""
KEEPALIVE_TIMEOUT_S = 75.0
"""An idle keep-alive connection is closed after this long (Prometheus scrapes every 15-60 s)."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    """The raw query string after ``?`` (empty when there is none), passed on as is."""
    headers: Headers
    peer: str | None
    """The client's IP address."""
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status=status, body=text.encode())

    @classmethod
    def json(cls, doc: Any, status: int = 200, **dumps: Any) -> Response:
        return cls(status=status, body=json.dumps(doc, **dumps).encode(), content_type="application/json")

    def gzipped(self) -> Response:
        """The same response with a gzip-encoded body (for clients that sent ``Accept-Encoding: gzip``)."""
        packer = zlib.compressobj(6, zlib.DEFLATED, 31)
        body = packer.compress(self.body) + packer.flush()
        return Response(self.status, body, self.content_type, (*self.headers, ("Content-Encoding", "gzip")))


Handler = Callable[[Request], Awaitable[Response]]


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _head_bytes(response: Response, *, keep_alive: bool) -> bytes:
    fields = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        *response.headers,
    ]
    if not keep_alive:
        fields.append(("Connection", "close"))
    return render_head(f"HTTP/1.1 {response.status} {_reason(response.status)}", fields)


def _wants_keep_alive(version: str, headers: Headers) -> bool:
    tokens = {t.strip().lower() for t in ",".join(headers.get_all("Connection")).split(",")}
    if version == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


class _Connection:
    def __init__(self, handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handler = handler
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else None

    async def serve(self) -> None:
        waiting = HEAD_TIMEOUT_S
        try:
            while True:
                try:
                    async with asyncio.timeout(waiting):
                        head = await read_head(self._reader)
                        if head is None:
                            return
                        request, keep_alive = await self._request(*head)
                except HttpError as exc:
                    await self._send(Response.text(f"bad request: {exc}\n", 400), keep_alive=False, head_only=False)
                    return
                except TimeoutError:
                    return
                try:
                    response = await self._handler(request)
                except Exception:
                    log.exception("status request %s %s failed", request.method, request.path)
                    response = Response.text("internal error\n", 500)
                await self._send(response, keep_alive=keep_alive, head_only=request.method == "HEAD")
                if not keep_alive:
                    return
                waiting = KEEPALIVE_TIMEOUT_S
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()

    async def _request(self, start: str, headers: Headers) -> tuple[Request, bool]:
        parts = start.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(f"malformed request line {start[:80]!r}")
        method, target, version = parts
        if (headers.get("Expect") or "").lower() == "100-continue":
            self._writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await read_body(self._reader, headers, limit=MAX_REQUEST_BODY, until_eof=False)
        path, _, query = target.partition("?")
        request = Request(method=method, path=path, query=query, headers=headers, peer=self._peer, body=body)
        return request, _wants_keep_alive(version, headers)

    async def _send(self, response: Response, *, keep_alive: bool, head_only: bool) -> None:
        self._writer.write(_head_bytes(response, keep_alive=keep_alive))
        if response.body and not head_only:
            self._writer.write(response.body)
        await self._writer.drain()


class HttpServer:
    """A listening server; ``close()`` also ends the connections still open (idle keep-alives, slow clients)."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await _Connection(self._handler, reader, writer).serve()
        finally:
            self._tasks.discard(task)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._connected, host, port, limit=MAX_HEAD_BYTES, reuse_address=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def start_server(handler: Handler, host: str, port: int) -> HttpServer:
    """Serve ``handler`` on ``host:port`` (every address a name resolves to, like asyncio's own servers)."""
    server = HttpServer(handler)
    await server.start(host, port)
    return server
