"""Forwarding queries the NameTable does not own to the original resolv.conf servers.

The client's packet goes out unchanged (same ID, flags, EDNS0) over the client's transport, one
fresh socket per exchange like miekg/dns's client, so concurrent queries with equal IDs cannot be
confused.  Sequential mode tries the servers in a shuffled order until one answers (any RCODE is an
answer); parallel mode asks all and takes the first answer.  None means every server failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Sequence

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
                    reply = await _udp_exchange(upstream, query, bufsize)
            # miekg/dns unpacks the reply; one it cannot parse counts as a failed server.
            wire.parse_message(reply)
            return reply
        except (TimeoutError, OSError, wire.FormatError, asyncio.IncompleteReadError, UpstreamError) as err:
            self.failures[f"{upstream[0]}:{upstream[1]}"] += 1
            reason = "timed out" if isinstance(err, TimeoutError) else str(err) or type(err).__name__
            raise UpstreamError(f"{upstream[0]}:{upstream[1]}: {reason}") from None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def _udp_exchange(upstream: Address, query: bytes, bufsize: int) -> bytes:
    loop = asyncio.get_running_loop()
    sock = socket.socket(_family(upstream[0]), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        # connect() makes the kernel drop datagrams from anyone but the upstream and report ICMP
        # port-unreachable as ECONNREFUSED, so a dead server fails fast instead of timing out.
        await loop.sock_connect(sock, upstream)
        await loop.sock_sendall(sock, query)
        while True:
            # One byte more than allowed, to see an oversized (untruncated) reply and reject it the
            # way a fixed-size receive buffer would.
            reply = await loop.sock_recv(sock, bufsize + 1)
            if len(reply) > bufsize:
                raise UpstreamError(f"reply of more than {bufsize} bytes exceeds the client's UDP size")
            if len(reply) >= wire.HEADER_LEN and reply[0:2] == query[0:2] and reply[2] & 0x80:
                return reply
            # Wrong ID or not a response: keep waiting for the real one (until the timeout).
    finally:
        sock.close()


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
