"""The DNS proxy's UDP side: one thread and one epoll for every listening socket and every upstream.

Why a plain thread and not an event loop: a table hit is ``recvfrom`` → dict lookup → ``sendto``,
and a forward adds one ``send`` and one ``recv`` on a connected socket to the upstream.  An event loop
wraps each of those in a callback, a future or a task, and handing a query to another thread costs a
GIL hand-off; either costs more than the work itself.  Here every readable socket is drained in
batches (one ``epoll_wait`` for many datagrams under load), forwards wait in plain dicts keyed by
the upstream query ID, and timeouts are found by looking at the oldest entry of each dict (entries
go in with the same timeout, so insertion order is deadline order).

Forwarding is Istio's: the client's packet goes out unchanged but for a fresh random ID (the
client's is put back on the reply), over one connected socket per upstream (the kernel drops
datagrams from anyone else and reports ICMP errors, so a dead server fails fast).  Sequential mode
tries the resolv.conf servers in a shuffled order and moves to the next when one times out, refuses,
answers with something that is not a DNS message or with more than the client's UDP size; parallel
mode asks all and takes the first answer.  When every server failed the client gets SERVFAIL.
Nothing is cached.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from vm_agent.dns import wire
from vm_agent.dns.forward import Address, upstream_name, upstream_order
from vm_agent.dns.handler import Outcome, fast_reply, handle, plain_miss, servfail
from vm_agent.dns.index import IdSource, TableRef, random_id
from vm_agent.dns.metrics import DnsStats
from vm_agent.logs import get_logger

log = get_logger("dns")

# Bounds that keep a flood from growing memory without limit or starving the other sockets.
MAX_PENDING_FORWARDS = 2048
MAX_IN_FLIGHT_PER_UPSTREAM = 0x8000  # half the ID space, so a free ID is found in a few draws
BATCH = 64  # datagrams read from one socket before the others get their turn
UPSTREAM_RCVBUF = 4 << 20


class _Forward:
    """One client query on its way upstream."""

    __slots__ = ("addr", "bufsize", "data", "deadline", "listener", "order", "outstanding", "tries")

    def __init__(self, listener: socket.socket, addr: Any, data: bytes, bufsize: int) -> None:
        self.listener = listener
        self.addr = addr
        self.data = data
        self.bufsize = bufsize  # the client's UDP size: a larger reply is a failure, as in miekg/dns
        self.deadline = 0.0
        self.order: list[int] = []  # upstreams still to try, the next one last
        self.outstanding = 0  # exchanges in flight
        self.tries: list[tuple[int, int]] = []  # parallel mode: (upstream, our ID) of every exchange sent


class UdpEngine:
    def __init__(
        self,
        listeners: Sequence[socket.socket],
        upstreams: Sequence[Address],
        timeout: float,
        parallel: bool,
        table: TableRef,
        stats: DnsStats,
        next_id: IdSource = random_id,
    ) -> None:
        self._listeners = tuple(listeners)  # bound by the server, which also closes them
        self.upstreams = tuple(upstreams)
        self._names = [upstream_name(u) for u in self.upstreams]
        self.timeout = timeout
        self.parallel = parallel and len(self.upstreams) > 1
        self._table = table
        self._stats = stats
        self._next_id = next_id
        # "host:port" → failed exchanges (the stats' dict, so counts outlive the engine); only this thread writes.
        self.failures = stats.upstream_failures
        for name in self._names:
            self.failures.setdefault(name, 0)
        self._socks: list[socket.socket | None] = [None] * len(self.upstreams)
        self._waiting: list[dict[int, _Forward]] = [{} for _ in self.upstreams]
        self.pending = 0  # client queries being forwarded
        self._stopping = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, Callable[[], None]] = {}

    # ---- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop``; runs in its own thread."""
        self._epoll = epoll = select.epoll()
        try:
            for sock in self._listeners:
                sock.setblocking(False)
                self._watch(sock, self._drain_listener_fn(sock))
            epoll.register(self._wake, select.EPOLLIN)
            self._handlers[self._wake] = self._drain_wake
            handlers = self._handlers
            while not self._stopping:
                for fd, _ in epoll.poll(self._poll_timeout()):
                    handler = handlers.get(fd)
                    if handler is not None:
                        handler()
                if self.pending:
                    self._expire(time.monotonic())
        finally:
            self._stopping = True
            epoll.close()
            self._epoll = None
            for i, upstream in enumerate(self._socks):
                if upstream is not None:
                    upstream.close()
                self._socks[i] = None
            # In-flight forwards are dropped on stop: their clients retry.
            for waiting in self._waiting:
                waiting.clear()
            self.pending = 0

    def stop(self) -> None:
        """Ask ``run`` to return (from any thread)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Release the wake-up descriptor, after ``run`` returned."""
        with contextlib.suppress(OSError):
            os.close(self._wake)

    def _watch(self, sock: socket.socket, handler: Callable[[], None]) -> None:
        assert self._epoll is not None
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._handlers[sock.fileno()] = handler

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(self._wake)

    def _poll_timeout(self) -> float | None:
        if not self.pending:
            return None
        oldest = min((next(iter(w.values())).deadline for w in self._waiting if w), default=None)
        if oldest is None:
            return None
        return max(0.0, oldest - time.monotonic())

    # ---- clients ---------------------------------------------------------------------------

    def _drain_listener_fn(self, sock: socket.socket) -> Callable[[], None]:
        recvfrom, sendto = sock.recvfrom, sock.sendto
        stats = self._stats
        table = self._table
        next_id = self._next_id
        forward = self._forward

        def drain() -> None:
            for _ in range(BATCH):
                try:
                    data, addr = recvfrom(65535)
                except BlockingIOError:
                    return
                except OSError:
                    continue  # e.g. an ICMP error left on the socket: nothing to answer
                try:
                    index = table.index
                    if index is not None:
                        reply = fast_reply(index.exact, data, False, next_id)
                        if reply is not None:
                            sendto(reply, addr)
                            stats.fast_hits += 1
                            continue
                    limit = plain_miss(index, data)
                    if limit is not None:
                        forward(sock, data, addr, limit, index is None)
                    else:
                        self._general(sock, data, addr)
                except OSError:
                    pass  # our reply could not be sent; the client retries
                except Exception:
                    # A bug must not take DNS down for the whole host; count it and keep serving.
                    stats.outcome("error")
                    log.exception("DNS query from %s failed", addr)

        return drain

    def _general(self, sock: socket.socket, data: bytes, addr: Any) -> None:
        index = self._table.index
        decision = handle(index, data, False, self._next_id, try_fast=False)
        if decision.outcome in (Outcome.MISS, Outcome.UNSYNCED):
            assert decision.message is not None
            limit = wire.udp_limit(decision.message.edns_size)
            self._forward(sock, data, addr, limit, decision.outcome is Outcome.UNSYNCED)
            return
        self._stats.outcome(decision.outcome.value)
        if decision.reply is not None:
            sock.sendto(decision.reply, addr)
            self._stats.rcode(decision.reply)

    # ---- forwarding ------------------------------------------------------------------------

    def _forward(self, sock: socket.socket, data: bytes, addr: Any, bufsize: int, unsynced: bool) -> None:
        if self.pending >= MAX_PENDING_FORWARDS:
            self._stats.outcome("overload")
            return  # the client retries; better than queueing without bound
        self._stats.outcome("unsynced" if unsynced else "miss")
        fwd = _Forward(sock, addr, data, bufsize)
        self.pending += 1
        now = time.monotonic()
        count = len(self.upstreams)
        if self.parallel:
            for i in range(count):
                self._send(fwd, i, now)
            if not fwd.outstanding:
                self._give_up(fwd)
            return
        if count > 1:
            fwd.order = upstream_order(count, self._next_id)
            fwd.order.reverse()
        elif count == 1:
            fwd.order = [0]
        self._next_try(fwd, now)

    def _next_try(self, fwd: _Forward, now: float) -> None:
        order = fwd.order
        while order:
            if self._send(fwd, order.pop(), now):
                return
        self._give_up(fwd)

    def _send(self, fwd: _Forward, i: int, now: float) -> bool:
        sock = self._socks[i]
        if sock is None:
            sock = self._open(i)
            if sock is None:
                return False
        waiting = self._waiting[i]
        if len(waiting) >= MAX_IN_FLIGHT_PER_UPSTREAM:
            self._count_failure(i, "too many queries in flight")
            return False
        qid = random.getrandbits(16)
        while qid in waiting:
            qid = random.getrandbits(16)
        try:
            sock.send(qid.to_bytes(2, "big") + fwd.data[2:])
        except OSError as err:
            self._count_failure(i, err.strerror or str(err))
            return False
        waiting[qid] = fwd
        fwd.deadline = now + self.timeout
        fwd.outstanding += 1
        if self.parallel:
            fwd.tries.append((i, qid))
        return True

    def _open(self, i: int) -> socket.socket | None:
        host, port = self.upstreams[i]
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UPSTREAM_RCVBUF)
            sock.connect((host, port))
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            self._count_failure(i, err.strerror or str(err))
            return None
        self._socks[i] = sock
        self._watch(sock, self._drain_upstream_fn(i, sock))
        return sock

    def _drain_upstream_fn(self, i: int, sock: socket.socket) -> Callable[[], None]:
        recv = sock.recv
        waiting = self._waiting[i]
        check = wire.check_reply

        def drain() -> None:
            for _ in range(BATCH):
                try:
                    data = recv(65535)
                except BlockingIOError:
                    return
                except OSError as err:
                    # An ICMP error does not say which query it belongs to: every query waiting on
                    # this server moves on to the next one.
                    self._fail_all(i, err.strerror or str(err))
                    continue
                if len(data) < wire.HEADER_LEN or not data[2] & 0x80:
                    continue
                fwd = waiting.pop((data[0] << 8) | data[1], None)
                if fwd is None:
                    continue  # late (timed out) or not ours
                try:
                    if len(data) > fwd.bufsize:
                        # What a receive buffer of the client's size would do to an untruncated reply.
                        raise wire.FormatError(
                            f"reply of {len(data)} bytes exceeds the client's UDP size {fwd.bufsize}"
                        )
                    check(data)
                except wire.FormatError as err:
                    self._failed(fwd, i, str(err), time.monotonic())
                    continue
                self._answer(fwd, i, fwd.data[0:2] + data[2:])

        return drain

    def _answer(self, fwd: _Forward, i: int, reply: bytes) -> None:
        if self.parallel:
            for j, qid in fwd.tries:
                # The ID may already serve another query if this exchange failed earlier.
                if j != i and self._waiting[j].get(qid) is fwd:
                    del self._waiting[j][qid]
        fwd.outstanding = 0
        self.pending -= 1
        stats = self._stats
        stats.forward_ok += 1
        stats.rcode(reply)
        try:  # noqa: SIM105 (per forwarded query: a plain try costs less than contextlib.suppress)
            fwd.listener.sendto(reply, fwd.addr)
        except OSError:
            pass  # the client went away; nothing to tell it

    def _count_failure(self, i: int, reason: str) -> None:
        self.failures[self._names[i]] += 1
        # Per query, so debug: a dead resolver shows in the failure counters instead.
        log.debug("%s: %s", self._names[i], reason)

    def _failed(self, fwd: _Forward, i: int, reason: str, now: float) -> None:
        self._count_failure(i, reason)
        fwd.outstanding -= 1
        if self.parallel:
            if not fwd.outstanding:
                self._give_up(fwd)
        else:
            self._next_try(fwd, now)

    def _fail_all(self, i: int, reason: str) -> None:
        waiting = self._waiting[i]
        failed = list(waiting.values())
        waiting.clear()
        now = time.monotonic()
        for fwd in failed:
            self._failed(fwd, i, reason, now)

    def _expire(self, now: float) -> None:
        for i, waiting in enumerate(self._waiting):
            while waiting:
                qid = next(iter(waiting))
                fwd = waiting[qid]
                if fwd.deadline > now:
                    break
                del waiting[qid]
                self._failed(fwd, i, "timed out", now)

    def _give_up(self, fwd: _Forward) -> None:
        self.pending -= 1
        stats = self._stats
        stats.forward_failed += 1
        try:
            reply = servfail(wire.parse_message(fwd.data))
        except wire.FormatError:
            return  # cannot happen for a query we forwarded; nothing sensible to answer
        stats.rcode(reply)
        with contextlib.suppress(OSError):
            fwd.listener.sendto(reply, fwd.addr)
