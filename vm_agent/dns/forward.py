"""Forwarding over TCP to the original resolv.conf servers (UDP forwarding lives in ``udp``).

The client's packet goes out unchanged (flags, EDNS0) on a fresh connection per query, like
miekg/dns's client in Istio's agent.  Sequential mode tries the servers in a shuffled order until
one answers (any RCODE is an answer); parallel mode asks all and takes the first answer.  None means
every server failed.  Both transports share ``upstream_order`` and the reply check, so they fail
over the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence

from vm_agent.dns import wire
from vm_agent.dns.index import IdSource, random_id, shuffle
from vm_agent.logs import get_logger

log = get_logger("dns")

Address = tuple[str, int]


class UpstreamError(Exception):
    """One exchange with one upstream failed."""


def upstream_name(upstream: Address) -> str:
    return f"{upstream[0]}:{upstream[1]}"


def upstream_order(count: int, next_id: IdSource = random_id) -> list[int]:
    """Indexes of the upstreams in the order one query tries them: Istio shuffles the resolv.conf
    servers per query with the same round-robin it applies to answers."""
    order = list(range(count))
    shuffle(order, next_id)
    return order


class TcpForwarder:
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
        # "host:port" → failed exchanges; only this forwarder's thread writes it.
        self.failures: dict[str, int] = {upstream_name(u): 0 for u in self.upstreams}

    async def exchange(self, query: bytes) -> bytes | None:
        """The first upstream reply to ``query``, or None when every server failed."""
        if not self.upstreams:
            return None
        if self.parallel and len(self.upstreams) > 1:
            return await self._parallel(query)
        for i in upstream_order(len(self.upstreams), self._next_id):
            try:
                return await self._one(self.upstreams[i], query)
            except UpstreamError as err:
                # Per query, so debug: a dead resolver shows in the failure counters instead.
                log.debug("%s", err)
        return None

    async def _parallel(self, query: bytes) -> bytes | None:
        tasks = [asyncio.create_task(self._one(u, query)) for u in self.upstreams]
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

    async def _one(self, upstream: Address, query: bytes) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                reply = await _tcp_exchange(upstream, query)
            # miekg/dns unpacks the reply; one it cannot parse counts as a failed server.
            wire.check_reply(reply)
            return reply
        except Exception as err:
            self.failures[upstream_name(upstream)] += 1
            reason = "timed out" if isinstance(err, TimeoutError) else str(err) or type(err).__name__
            raise UpstreamError(f"{upstream_name(upstream)}: {reason}") from None


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
