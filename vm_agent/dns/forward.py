"""Forwarding queries the NameTable does not own to the original resolv.conf servers.

The client's packet goes out unchanged (flags, EDNS0) over the client's transport: over TCP on a
fresh connection like miekg/dns's client, over UDP on one shared connected socket per upstream
under a fresh random ID (the client's ID is restored on the reply).  Sequential mode tries the
servers in a shuffled order until one answers (any RCODE is an answer); parallel mode asks all
and takes the first answer.  None means every server failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import Sequence
from typing import Any, cast

from vm_agent.dns import wire
from vm_agent.dns.index import IdSource, random_id, shuffle
from vm_agent.logs import get_logger

log = get_logger("dns")

Address = tuple[str, int]


class UpstreamError(Exception):
    """One exchange with one upstream failed."""


class Forwarder:
    def __init__(
        self,
        upstreams: Sequence[Address],
        timeout: float,
        parallel: bool,
        next_id: IdSource = random_id,
    ) -> None:
        self.upstreams = tuple(upstreams)
        self.timeout = timeout
        self.parallel = parallel
        self._next_id = next_id
        self.failures: dict[str, int] = {f"{h}:{p}": 0 for h, p in self.upstreams}
        self._channels: dict[Address, _UdpChannel] = {}
        self._opening = asyncio.Lock()

    async def _channel(self, upstream: Address) -> _UdpChannel:
        channel = self._channels.get(upstream)
        if channel is not None and channel.transport is not None:
            return channel
        # Queries racing to open the same channel must share one socket, not leak the others.
        async with self._opening:
            channel = self._channels.get(upstream)
            if channel is None or channel.transport is None:
                fresh = _UdpChannel(f"{upstream[0]}:{upstream[1]}")
                await asyncio.get_running_loop().create_datagram_endpoint(lambda: fresh, remote_addr=upstream)
                self._channels[upstream] = channel = fresh
            return channel

    def close(self) -> None:
        """Close the upstream sockets (in the loop that used them)."""
        for channel in self._channels.values():
            if channel.transport is not None:
                channel.transport.close()
        self._channels.clear()
        self._opening = asyncio.Lock()  # the next run() uses a new event loop

    async def exchange(self, query: bytes, tcp: bool, bufsize: int) -> bytes | None:
        """The first upstream reply to ``query``, or None when every server failed."""
        if not self.upstreams:
            return None
        if self.parallel and len(self.upstreams) > 1:
            return await self._parallel(query, tcp, bufsize)
        order = list(self.upstreams)
        shuffle(order, self._next_id)
        for upstream in order:
            try:
                return await self._one(upstream, query, tcp, bufsize)
            except UpstreamError as err:
                # Per query, so debug: a dead resolver shows in the failure counters instead.
                log.debug("%s", err)
        return None

    async def _parallel(self, query: bytes, tcp: bool, bufsize: int) -> bytes | None:
        tasks = [asyncio.create_task(self._one(u, query, tcp, bufsize)) for u in self.upstreams]
        try:
            for next_done in asyncio.as_completed(tasks):
                try:
                    return await next_done
                except UpstreamError as err:
                    log.debug("%s (parallel)", err)
            return None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, upstream: Address, query: bytes, tcp: bool, bufsize: int) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                if tcp:
                    reply = await _tcp_exchange(upstream, query)
                else:
                    reply = await (await self._channel(upstream)).exchange(query, bufsize)
            # miekg/dns unpacks the reply; one it cannot parse counts as a failed server.
            wire.parse_message(reply)
            return reply
        except Exception as err:
            self.failures[f"{upstream[0]}:{upstream[1]}"] += 1
            reason = "timed out" if isinstance(err, TimeoutError) else str(err) or type(err).__name__
            raise UpstreamError(f"{upstream[0]}:{upstream[1]}: {reason}") from None


class _UdpChannel(asyncio.DatagramProtocol):
    """One connected UDP socket to one upstream, shared by all queries in flight to it.

    Each query goes out under a fresh random ID (the client's is put back on the reply), so
    concurrent clients using the same ID cannot be confused.  Connecting the socket makes the
    kernel drop datagrams from anyone but the upstream and turns ICMP port-unreachable into an
    error, so a dead server fails fast instead of timing out.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None
        # our ID → (future, the client's UDP size, the client's ID)
        self.waiting: dict[int, tuple[asyncio.Future[bytes], int, bytes]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not an asyncio.DatagramTransport subclass, only quacks like one.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < wire.HEADER_LEN or not data[2] & 0x80:
            return
        entry = self.waiting.pop((data[0] << 8) | data[1], None)
        if entry is None:
            return  # late (timed out) or not ours
        future, bufsize, client_id = entry
        if future.done():
            return
        if len(data) > bufsize:
            # What a receive buffer of the client's size would do to an untruncated reply.
            future.set_exception(UpstreamError(f"reply of {len(data)} bytes exceeds the client's UDP size {bufsize}"))
        else:
            future.set_result(client_id + data[2:])

    def error_received(self, exc: Exception) -> None:
        # ICMP errors do not say which query they belong to: fail them all, the next server gets them.
        self._fail_all(UpstreamError(f"{self.name}: {exc.strerror if isinstance(exc, OSError) else exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail_all(UpstreamError(f"{self.name}: socket closed"))

    def _fail_all(self, err: UpstreamError) -> None:
        waiting, self.waiting = self.waiting, {}
        for future, _, _ in waiting.values():
            if not future.done():
                future.set_exception(err)

    async def exchange(self, query: bytes, bufsize: int) -> bytes:
        if self.transport is None or len(self.waiting) >= 0x8000:
            raise UpstreamError(f"{self.name}: channel unavailable")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        qid = random.getrandbits(16)
        while qid in self.waiting:
            qid = random.getrandbits(16)
        self.waiting[qid] = (future, bufsize, query[0:2])
        try:
            self.transport.sendto(qid.to_bytes(2, "big") + query[2:])
            return await future
        finally:
            if self.waiting.get(qid, (None,))[0] is future:
                del self.waiting[qid]


async def _tcp_exchange(upstream: Address, query: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(upstream[0], upstream[1])
    try:
        writer.write(struct.pack(">H", len(query)) + query)
        await writer.drain()
        (length,) = struct.unpack(">H", await reader.readexactly(2))
        reply = await reader.readexactly(length)
        if len(reply) < wire.HEADER_LEN or reply[0:2] != query[0:2]:
            raise UpstreamError("TCP reply with a different ID or without a header")
        return reply
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
