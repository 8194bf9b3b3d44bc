"""Reading HTTP/1.1 message heads and bodies from an asyncio stream (RFC 9112), for both directions.

Only what the agent's own endpoints, Envoy's admin API and readiness probes need: no trailers, no
pipelining beyond keep-alive, no upgrades. Limits keep a misbehaving peer from growing our memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

MAX_HEAD_BYTES = 64 * 1024
"""Start line plus headers; a longer head is refused."""


class HttpError(Exception):
    """The peer did not speak HTTP/1.x as expected; the message says what was wrong."""


class Headers:
    """Header fields in arrival order, looked up case-insensitively; repeated names keep every value."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields = list(fields)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        lower = name.lower()
        for key, value in self._fields:
            if key.lower() == lower:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self._fields if key.lower() == lower]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


async def read_head(reader: asyncio.StreamReader) -> tuple[str, Headers] | None:
    """The start line and headers of the next message; ``None`` at a clean end of stream before any byte."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise HttpError(f"connection closed in the middle of a message head ({len(exc.partial)} bytes)") from exc
    except asyncio.LimitOverrunError as exc:
        raise HttpError(f"message head longer than {MAX_HEAD_BYTES} bytes") from exc
    try:
        text = raw[:-4].decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise HttpError("message head is not text") from exc
    start, *lines = text.split("\r\n")
    fields: list[tuple[str, str]] = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(f"malformed header line {line[:80]!r}")
        fields.append((name, value.strip(" \t")))
    return start, Headers(fields)


def _content_length(headers: Headers) -> int | None:
    values = {v.strip() for v in headers.get_all("Content-Length")}
    if not values:
        return None
    if len(values) != 1:
        raise HttpError("conflicting Content-Length headers")
    value = values.pop()
    if not value.isdigit():
        raise HttpError(f"Content-Length {value[:40]!r} is not a number")
    return int(value)


def is_chunked(headers: Headers) -> bool:
    codings = ",".join(headers.get_all("Transfer-Encoding")).lower()
    return bool(codings.strip()) and codings.replace(" ", "").split(",")[-1] == "chunked"


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        text = line[:-2].split(b";", 1)[0].strip()
        try:
            chunk = int(text, 16)
        except ValueError as exc:
            raise HttpError(f"malformed chunk size {text[:20]!r}") from exc
        if chunk == 0:
            # Trailer fields (rare) end with an empty line like the head does.
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(parts)
        size += chunk
        if size > limit:
            raise HttpError(f"body larger than {limit} bytes")
        parts.append(await reader.readexactly(chunk))
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError("chunk not followed by CRLF")


async def read_body(reader: asyncio.StreamReader, headers: Headers, *, limit: int, until_eof: bool) -> bytes:
    """The body the head announced: chunked, Content-Length, or (a response without either) until EOF."""
    if is_chunked(headers):
        return await _read_chunked(reader, limit)
    length = _content_length(headers)
    if length is not None:
        if length > limit:
            raise HttpError(f"body of {length} bytes is larger than {limit}")
        return await reader.readexactly(length)
    if not until_eof:
        return b""
    data = await reader.read(limit + 1)
    chunks = [data]
    total = len(data)
    while data:
        if total > limit:
            raise HttpError(f"body larger than {limit} bytes")
        data = await reader.read(limit + 1 - total)
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def render_head(start: str, fields: Iterable[tuple[str, str]]) -> bytes:
    lines = [start, *(f"{name}: {value}" for name, value in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
