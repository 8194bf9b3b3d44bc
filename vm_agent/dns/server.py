"""The DNS proxy: UDP and TCP listeners answering from the NameIndex and forwarding the rest.

Threads, and why: the agent's event loop also runs xDS, SDS and health, so DNS gets its own.  UDP,
nearly all DNS traffic, is served by ``udp.UdpEngine`` on one thread without an event loop (table
hits and forwards alike); TCP runs on an event loop (uvloop when installed) in a second thread.  The
NameIndex is swapped by assigning one attribute (``TableRef.index``), atomic under the GIL, so a
query sees either the old or the new table whole.  Each thread counts into its own ``DnsStats``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from vm_agent.dns import wire
from vm_agent.dns.forward import TcpForwarder
from vm_agent.dns.handler import Outcome, handle, servfail
from vm_agent.dns.index import NameIndex, TableRef, alternate_hosts, build_index
from vm_agent.dns.metrics import DnsStats, register
from vm_agent.dns.udp import UdpEngine
from vm_agent.logs import get_logger
from vm_agent.proto import nds_pb2

try:
    import uvloop
except ImportError:  # optional: the TCP side runs on asyncio's own loop without it
    uvloop = None  # type: ignore[assignment]

log = get_logger("dns")

# Bounds that keep a slow client from growing memory without limit.
MAX_TCP_CLIENTS = 256
TCP_IDLE_TIMEOUT = 10.0
UDP_RCVBUF = 4 << 20


def _check_address(value: Any, where: str) -> tuple[str, int]:
    if not (isinstance(value, tuple) and len(value) == 2):
        raise ValueError(f"{where}: expected (ip, port), got {value!r}")
    host, port = value
    try:
        ipaddress.ip_address(host)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: {host!r} is not an IP address literal") from None
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{where}: port {port!r} is not in 0..65535")
    return host, port


@dataclass(frozen=True)
class DnsSettings:
    listen: tuple[tuple[str, int], ...]  # each address gets a UDP and a TCP listener
    upstreams: tuple[tuple[str, int], ...]  # resolv.conf nameservers, in file order
    search_domains: tuple[str, ...]  # resolv.conf search list; the first drives the CNAME shortcut
    pod_namespace: str
    proxy_domain: str  # DNS domain without the namespace label, e.g. "svc.cluster.local"
    forward_timeout: float = 5.0  # per upstream exchange
    forward_parallel: bool = False

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("DnsSettings.listen: at least one (ip, port) is needed")
        for i, addr in enumerate(self.listen):
            _check_address(addr, f"DnsSettings.listen[{i}]")
        for i, addr in enumerate(self.upstreams):
            _check_address(addr, f"DnsSettings.upstreams[{i}]")
        for i, domain in enumerate(self.search_domains):
            wire.text_to_name(domain, f"DnsSettings.search_domains[{i}]")
        if not self.forward_timeout > 0:
            raise ValueError(f"DnsSettings.forward_timeout: {self.forward_timeout!r} must be > 0 seconds")


def default_listen(upstreams: Sequence[tuple[str, int]], port: int = 15053) -> tuple[tuple[str, int], ...]:
    """Istio's ``localhost:<port>`` rule: 127.0.0.1 if any IPv4 resolver, ::1 if any IPv6 one."""
    families = {ipaddress.ip_address(host).version for host, _ in upstreams}
    out: list[tuple[str, int]] = []
    if 4 in families or not families:
        out.append(("127.0.0.1", port))
    if 6 in families:
        out.append(("::1", port))
    return tuple(out)


class DnsServer:
    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        self.ready = asyncio.Event()
        self._current = TableRef()
        self._table: nds_pb2.NameTable | None = None
        self._stats = DnsStats()  # TCP: the DNS loop's thread
        self._udp_stats = DnsStats()  # UDP: the engine's thread
        register(self._stats)
        register(self._udp_stats)
        self._forwarder = TcpForwarder(settings.upstreams, settings.forward_timeout, settings.forward_parallel)
        self._stats.upstream_failures = self._forwarder.failures
        # Kept across runs (counters never go back); the UDP engine of each run counts into it.
        self._udp_stats.upstream_failures = {f"{h}:{p}": 0 for h, p in settings.upstreams}
        self._engine: UdpEngine | None = None
        self._updates = 0
        self._rejected = 0
        self._last_error = ""
        self._last_update = 0.0
        self._bound: list[tuple[str, int]] = []
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._tcp_tasks: set[asyncio.Task[Any]] = set()
        self.tcp_idle_timeout = TCP_IDLE_TIMEOUT
        self._update_lock = asyncio.Lock()

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopping = False
        thread = threading.Thread(target=self._thread_main, args=(started, finished), name="vm-agent-dns", daemon=True)
        thread.start()
        try:
            await asyncio.wrap_future(started)
            self.ready.set()
            log.info(
                "DNS proxy listening on %s (UDP+TCP), upstreams %s",
                ", ".join(f"{h}:{p}" for h, p in self._bound),
                ", ".join(f"{h}:{p}" for h, p in self.settings.upstreams) or "none",
            )
            await asyncio.wrap_future(finished)
            # Only a bug ends the DNS thread before we ask it to: let the agent's TaskGroup see it.
            raise RuntimeError("DNS proxy thread stopped unexpectedly")
        finally:
            self.ready.clear()
            self._request_stop()
            # Short: the DNS thread only closes sockets and cancels in-flight forwards.
            thread.join(timeout=10)

    def _request_stop(self) -> None:
        self._stopping = True
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def _thread_main(self, started: concurrent.futures.Future[None], finished: concurrent.futures.Future[None]) -> None:
        loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
        # A running future cannot be cancelled, so run() being cancelled (which cancels the
        # wrappers) cannot make our set_result calls fail; run() stops us through _request_stop.
        finished.set_running_or_notify_cancel()
        try:
            loop.run_until_complete(self._serve(started))
            if not finished.done():
                finished.set_result(None)
        except BaseException as err:
            if not started.done():
                started.set_exception(err)
            elif not self._stopping:
                log.exception("DNS thread failed")
            if not finished.done():
                finished.set_exception(err)
        finally:
            self._loop = None
            loop.close()

    async def _serve(self, started: concurrent.futures.Future[None]) -> None:
        self._stop_event = stop_event = asyncio.Event()
        self._loop = loop = asyncio.get_running_loop()
        udp_socks: list[socket.socket] = []
        servers: list[asyncio.Server] = []
        engine: UdpEngine | None = None
        udp_thread: threading.Thread | None = None
        udp_failed: list[BaseException] = []
        try:
            for host, port in self.settings.listen:
                udp, tcp = _bind_pair(host, port)
                udp_socks.append(udp)
                servers.append(await asyncio.start_server(self._tcp_client, sock=tcp))
                self._bound.append((host, udp.getsockname()[1]))
            if self._stopping or not started.set_running_or_notify_cancel():
                return
            s = self.settings
            engine = UdpEngine(
                udp_socks, s.upstreams, s.forward_timeout, s.forward_parallel, self._current, self._udp_stats
            )
            self._engine = engine

            def serve_udp(engine: UdpEngine = engine) -> None:
                try:
                    engine.run()
                except BaseException as err:
                    udp_failed.append(err)
                finally:
                    # The engine only returns early on a bug: stop the whole proxy so run() reports it.
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(stop_event.set)

            udp_thread = threading.Thread(target=serve_udp, name="vm-agent-dns-udp", daemon=True)
            udp_thread.start()
            started.set_result(None)
            await stop_event.wait()
            if udp_failed:
                raise RuntimeError("DNS UDP thread failed") from udp_failed[0]
            self._stopping = True
        finally:
            self._stopping = True
            for server in servers:
                server.close()
            for task in self._tcp_tasks:
                task.cancel()
            await asyncio.gather(*self._tcp_tasks, return_exceptions=True)
            if engine is not None:
                engine.stop()
                if udp_thread is not None:
                    await asyncio.to_thread(udp_thread.join, 5)
                engine.close()
            self._engine = None
            for udp in udp_socks:
                udp.close()
            for server in servers:
                with contextlib.suppress(Exception):
                    await server.wait_closed()
            self._bound.clear()

    # ---- NameTable -------------------------------------------------------------------------

    async def update(self, table: nds_pb2.NameTable) -> None:
        """Replace the table atomically; ``ValueError`` (and the old table stays) if malformed."""
        if not isinstance(table, nds_pb2.NameTable):
            raise ValueError(f"NameTable expected, got {type(table).__name__}")
        # One build at a time, so an older table finishing late can never replace a newer one.
        async with self._update_lock:
            await self._update(table)

    async def _update(self, table: nds_pb2.NameTable) -> None:
        s = self.settings
        try:
            index, kept = await asyncio.to_thread(_build, table, s.search_domains, s.pod_namespace, s.proxy_domain)
        except ValueError as err:
            self._rejected += 1
            self._last_error = str(err)
            log.warning("NameTable rejected, keeping the previous one: %s", err)
            raise
        self._current.index = index
        self._table = kept
        self._updates += 1
        self._last_update = time.time()
        self._stats.names = len(index)
        log.info("NameTable applied: %d entries, %d names", index.entries, len(index))

    def table_loaded(self) -> bool:
        return self._current.index is not None

    async def readiness(self) -> str | None:
        """A readiness check for the status server: Istio's /healthz/ready waits for the NameTable."""
        if not self.ready.is_set():
            return "DNS proxy is not listening yet"
        if self._current.index is None:
            return "DNS proxy has not received a NameTable yet"
        return None

    def ndsz(self) -> dict[str, Any]:
        index, table = self._current.index, self._table
        if index is None or table is None:
            return {"loaded": False}
        s = self.settings
        return {
            "loaded": True,
            "table": json_format.MessageToDict(table),
            # Recomputed here rather than kept: only /debug wants them, and they cost memory.
            "alt_hosts": {
                host: alternate_hosts(host, info, s.pod_namespace, s.proxy_domain) for host, info in table.table.items()
            },
        }

    def snapshot(self) -> dict[str, Any]:
        index = self._current.index
        tcp, udp, engine = self._stats, self._udp_stats, self._engine
        failures = {
            name: self._forwarder.failures.get(name, 0) + udp.upstream_failures.get(name, 0)
            for name in tcp.upstream_failures
        }
        return {
            "listening": [f"{h}:{p}" for h, p in self._bound],
            "ready": self.ready.is_set(),
            "table_loaded": index is not None,
            "table_entries": index.entries if index else 0,
            "table_names": len(index) if index else 0,
            "table_updates": self._updates,
            "table_rejected": self._rejected,
            "last_error": self._last_error,
            "last_update": self._last_update,
            "queries": _add(tcp.queries(), udp.queries()),
            "responses": _add(tcp.responses(), udp.responses()),
            "forwarded": {"ok": tcp.forward_ok + udp.forward_ok, "failed": tcp.forward_failed + udp.forward_failed},
            "upstreams": [
                {"address": f"{h}:{p}", "failures": failures.get(f"{h}:{p}", 0)} for h, p in self.settings.upstreams
            ],
            "forward_parallel": self.settings.forward_parallel,
            "forward_timeout": self.settings.forward_timeout,
            "pending_forwards": (engine.pending if engine is not None else 0) + len(self._tcp_tasks),
        }

    @property
    def bound(self) -> list[tuple[str, int]]:
        """The addresses actually bound (ports resolved when 0 was asked for)."""
        return list(self._bound)

    # ---- TCP -------------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._tcp_tasks) >= MAX_TCP_CLIENTS or task is None:
            self._stats.outcome("overload")
            writer.close()
            return
        self._tcp_tasks.add(task)
        try:
            while not self._stopping:
                # A client gets TCP_IDLE_TIMEOUT for each whole query: slow or stalled ones are cut.
                async with asyncio.timeout(self.tcp_idle_timeout):
                    (length,) = struct.unpack(">H", await reader.readexactly(2))
                    data = await reader.readexactly(length)
                reply = await self._tcp_answer(data)
                if reply is None:
                    break
                writer.write(struct.pack(">H", len(reply)) + reply)
                async with asyncio.timeout(self.tcp_idle_timeout):
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _tcp_answer(self, data: bytes) -> bytes | None:
        stats = self._stats
        try:
            decision = handle(self._current.index, data, True)
        except Exception:
            stats.outcome("error")
            log.exception("DNS query over TCP failed")
            return None
        stats.outcome(decision.outcome.value)
        if decision.outcome in (Outcome.MISS, Outcome.UNSYNCED):
            assert decision.message is not None
            reply = await self._forwarder.exchange(data)
            if reply is None:
                stats.forward_failed += 1
                reply = servfail(decision.message)
            else:
                stats.forward_ok += 1
            stats.rcode(reply)
            return reply
        if decision.reply is not None:
            stats.rcode(decision.reply)
        return decision.reply


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


def _build(
    table: nds_pb2.NameTable, search: tuple[str, ...], namespace: str, domain: str
) -> tuple[NameIndex, nds_pb2.NameTable]:
    # The message is kept, not copied (a 100k-entry copy costs time and memory): the xDS proxy
    # hands over a freshly decoded NameTable and does not touch it afterwards.
    return build_index(table, search, namespace, domain), table


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same address and port (port 0: the kernel picks one for UDP)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        with contextlib.suppress(OSError):
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        udp.bind((host, port))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, udp.getsockname()[1]))
        tcp.listen(128)
        tcp.setblocking(False)
    except OSError as err:
        udp.close()
        tcp.close()
        raise OSError(err.errno, f"DNS proxy cannot bind {host}:{port}: {err.strerror}") from None
    return udp, tcp
