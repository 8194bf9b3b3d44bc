"""A small authoritative DNS server for tests: the "upstream" the proxy forwards to.

It listens on UDP and TCP on a loopback address the test picks, answers every A query with
192.0.2.<n> (NXDOMAIN for names starting with ``nx``), and can be told to stay silent or to send
oversized replies.  It also records every query it sees, so tests can check what was forwarded.
Clients for the tests (``udp_query``, ``tcp_query``) live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

import dnslib


class TestResolver:
    __test__ = False  # not a pytest class

    def __init__(self, host: str, port: int, address: str = "192.0.2.1", mode: str = "answer") -> None:
        self.host = host
        self.port = port
        self.address = address
        self.mode = mode  # answer | silent | big
        self.queries: list[tuple[str, str, int]] = []  # (transport, qname, qtype)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def reply_to(self, data: bytes, transport: str) -> bytes | None:
        req = dnslib.DNSRecord.parse(data)
        q = req.q
        self.queries.append((transport, str(q.qname).lower(), int(q.qtype)))
        if self.mode == "silent":
            return None
        reply = req.reply()
        reply.header.aa = 0
        name = str(q.qname)
        if name.lower().startswith("nx"):
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
        elif self.mode == "big":
            for i in range(60):
                reply.add_answer(dnslib.RR(q.qname, dnslib.QTYPE.TXT, rdata=dnslib.TXT(f"filler-{i:03d}-" + "x" * 40)))
        elif q.qtype == dnslib.QTYPE.A:
            reply.add_answer(dnslib.RR(q.qname, dnslib.QTYPE.A, rdata=dnslib.A(self.address), ttl=60))
        packed: bytes = reply.pack()
        return packed

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        owner = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                out = owner.reply_to(data, "udp")
                if out is not None:
                    self.transport.sendto(out, addr)

        transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, self.port))
        self._udp = transport
        self._tcp = await asyncio.start_server(self._tcp_client, self.host, self.port)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n,) = struct.unpack(">H", await reader.readexactly(2))
                out = self.reply_to(await reader.readexactly(n), "tcp")
                if out is None:
                    await asyncio.sleep(3600)
                    return
                writer.write(struct.pack(">H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 1)


async def udp_exchange(addr: tuple[str, int], packet: bytes, timeout: float = 5.0, bufsize: int = 65535) -> bytes:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, addr)
        await loop.sock_sendall(sock, packet)
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(sock, bufsize)


async def tcp_exchange(addr: tuple[str, int], packet: bytes, timeout: float = 5.0) -> bytes:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(addr[0], addr[1])
        try:
            writer.write(struct.pack(">H", len(packet)) + packet)
            await writer.drain()
            (n,) = struct.unpack(">H", await reader.readexactly(2))
            return await reader.readexactly(n)
        finally:
            writer.close()


async def exchange(transport: str, addr: tuple[str, int], packet: bytes, timeout: float = 5.0) -> bytes:
    if transport == "tcp":
        return await tcp_exchange(addr, packet, timeout)
    return await udp_exchange(addr, packet, timeout)


def question(name: str, qtype: str = "A", edns: int | None = None, qid: int | None = None) -> bytes:
    q = dnslib.DNSRecord.question(name, qtype)
    if qid is not None:
        q.header.id = qid
    if edns is not None:
        q.add_ar(dnslib.EDNS0(udp_len=edns))
    packed: bytes = q.pack()
    return packed
