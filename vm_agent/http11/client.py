"""One HTTP/1.1 request per connection: Envoy's admin API and the workload's HTTP readiness probes.

Both talk to something on this host a few times a second at most, so every request opens its own
connection and sends ``Connection: close`` (Istio's probe transport disables keep-alives too). Callers
bound the whole exchange with ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from vm_agent.http11.message import MAX_HEAD_BYTES, Headers, HttpError, read_body, read_head, render_head

MAX_RESPONSE_BODY = 256 * 1024 * 1024
"""Envoy's /stats/prometheus on a large mesh runs to tens of MiB; anything past this is refused."""


class ConnectError(OSError):
    """The connection could not be made (refused, unreachable, name unknown); ``os_error`` says why."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(os_error.errno, os_error.strerror or str(os_error))
        self.os_error = os_error


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Headers
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _status(start: str) -> int:
    version, _, rest = start.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit() or rest[3:4] not in ("", " "):
        raise HttpError(f"malformed HTTP response {start[:80]!r}")
    return int(code)


async def fetch(
    method: str,
    host: str,
    port: int,
    target: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    tls: ssl.SSLContext | None = None,
    local_addr: tuple[str, int] | None = None,
    family: int = 0,
    read_body_too: bool = True,
) -> Reply:
    """Send ``method target`` to ``host:port`` and read the answer.

    ``headers`` are sent as given (a ``Host`` among them replaces the default one). With ``read_body_too``
    false only the status and headers are read (a probe judges the status alone). ``ConnectError`` when
    the connection cannot be made, ``ssl.SSLError`` when its TLS handshake fails, ``OSError`` when it
    breaks, ``HttpError`` when the answer is not HTTP/1.x, ``asyncio.IncompleteReadError`` when the peer
    closes early.
    """
    try:
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=tls,
            server_hostname=host if tls is not None else None,
            local_addr=local_addr,
            family=family,
            limit=MAX_HEAD_BYTES,
        )
    except ssl.SSLError:
        raise
    except OSError as exc:
        raise ConnectError(exc) from exc
    try:
        fields = list(headers)
        if not any(name.lower() == "host" for name, _ in fields):
            fields.insert(0, ("Host", authority(host, port)))
        fields.append(("Connection", "close"))
        if method in ("POST", "PUT"):
            fields.append(("Content-Length", "0"))
        writer.write(render_head(f"{method} {target} HTTP/1.1", fields))
        await writer.drain()
        while True:
            head = await read_head(reader)
            if head is None:
                raise asyncio.IncompleteReadError(b"", None)
            status = _status(head[0])
            if status >= 200 or status == 101:
                break  # 1xx interim answers (100 Continue, 103 Early Hints) precede the real one
        reply_headers = head[1]
        body = b""
        if read_body_too and method != "HEAD" and status not in (204, 304):
            body = await read_body(reader, reply_headers, limit=MAX_RESPONSE_BODY, until_eof=True)
        return Reply(status, reply_headers, body)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
