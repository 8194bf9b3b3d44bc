"""The ADS proxy between Envoy (UDS, plaintext) and istiod (TLS): istio-agent.md §5.

Each downstream stream Envoy opens gets its own fresh upstream channel and stream of the same flavour
(SotW ↔ SotW, Delta ↔ Delta). Envoy's messages travel as bytes in both directions; the proxy only peeks
at a few top-level fields (``wire``) to find the type of a response and Envoy's first LDS request.

Flow control: each direction is its own task, so a slow reader on one side never stops the other side
from draining (no send/recv deadlock). Downstream requests take a credit before they are read, and the
credit comes back once the request is written upstream, so at most ``_REQUEST_CREDITS`` of Envoy's
requests are held in memory. Responses are read one at a time and written to Envoy before the next is
read, so memory holds one response plus what gRPC's flow-control windows allow. The agent's own
requests (NDS subscription, ACK/NACK, health) never wait for a credit: they are few and small, and
making them wait could block the response loop on the request loop.

Dials to istiod are paced across streams (``pacing``); which health reports go out when is decided by
``health_report``, which this module only feeds (reports from the checker, what EDS shows) and carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.exceptions
from google.protobuf.message import DecodeError
from grpclib.client import Stream as UpstreamCall
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from vm_agent.health.event import HealthEvent
from vm_agent.logs import get_logger
from vm_agent.proto import HEALTH_INFO_TYPE_URL, NAME_TABLE_TYPE_URL, nds_pb2
from vm_agent.upstream import (
    UNAVAILABLE_ERRORS,
    ClientCertProvider,
    RawCodec,
    UpstreamError,
    UpstreamSettings,
    call_metadata,
    open_channel,
)
from vm_agent.xds import metrics
from vm_agent.xds.downstream import ADS_SERVICE, METHODS, Downstream, ads_server
from vm_agent.xds.eds_witness import ENDPOINT_TYPE_URL, EdsWitness
from vm_agent.xds.endpoint_hold import NONCE_PREFIX, EndpointHold
from vm_agent.xds.health_report import HealthReporter, Report, ReportPolicy
from vm_agent.xds.pacing import DialPacer, PacingSettings
from vm_agent.xds.wire import (
    INTERNAL,
    Flavour,
    WireError,
    build_request,
    first_resource,
    peek_request,
    peek_response,
)

log = get_logger("xds")

LISTENER_TYPE_URL = "type.googleapis.com/envoy.config.listener.v3.Listener"
WORKLOAD_TYPE_URL = "type.googleapis.com/istio.workload.Workload"

_REQUEST_CREDITS = 16

_UPSTREAM_IO_ERRORS = (*UNAVAILABLE_ERRORS, StreamTerminatedError, ProtocolError, h2.exceptions.ProtocolError)
"""What a broken upstream connection or stream raises from a read or write."""

Upstream = UpstreamCall[bytes, bytes]
NameTableHandler = Callable[[nds_pb2.NameTable], Awaitable[None]]
ResponseRewriter = Callable[[bytes, str, bool], Awaitable[bytes]]
"""(response, type_url, delta) → what Envoy gets instead (vm_agent.telemetry fits istiod's config to the binary)."""


@dataclass(frozen=True)
class XdsSettings:
    socket_path: Path
    upstream: UpstreamSettings
    dns_enabled: bool
    """Subscribe to the NameTable after Envoy's first LDS request."""
    health: ReportPolicy = field(default_factory=ReportPolicy)
    """When health reports go out (confirmation, re-sends, the optional heartbeat); see health_report."""
    instance_ip: str | None = None
    """The address istiod registers this VM under: looked for in EDS to see whether a health report took."""
    pacing: PacingSettings = field(default_factory=PacingSettings)
    endpoint_hold_s: float = 0.0
    """After a lost upstream: how long Envoy keeps a cluster's endpoints that istiod's first updates empty
    (endpoint_hold.py); 0 turns it off."""
    max_downstream_message_bytes: int = 4 * 1024 * 1024


def forwardable(type_url: str) -> bool:
    """Whether a response of this type may reach Envoy (§5.4): Envoy's own types and ztunnel's Workload."""
    return type_url.startswith("type.googleapis.com/envoy.") or type_url == WORKLOAD_TYPE_URL


def classify(code: Status) -> str:
    """How worrying an upstream end is. Status texts differ between gRPC stacks, so only the code is used."""
    if code is Status.OK:
        return "graceful"
    if code in (
        Status.CANCELLED,
        Status.DEADLINE_EXCEEDED,
        Status.UNAVAILABLE,
        Status.RESOURCE_EXHAUSTED,  # istiod's admission limiter under load: back off, no alarm
    ):
        return "expected"
    return "unexpected"


@dataclass
class _TypeState:
    responses: int = 0
    bytes: int = 0
    forwarded: int = 0
    consumed: int = 0
    dropped: int = 0
    last_response_at: float | None = None
    last_nonce: str = ""
    last_version: str = ""
    acks: int = 0
    nacks: int = 0
    last_ack_at: float | None = None
    last_nack_at: float | None = None
    last_nack_message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _End:
    side: str
    code: Status
    details: str


@dataclass
class _Stream:
    """One downstream stream and the state it shares with its upstream twin."""

    id: int
    flavour: Flavour
    opened_at: float
    outbox: asyncio.Queue[tuple[bytes, bool]] = field(default_factory=asyncio.Queue)
    credits: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(_REQUEST_CREDITS))
    initial_sent: bool = False
    upstream_state: str = "connecting"
    requests: int = 0
    responses: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end: _End | None = None
    upstream_closed: bool = False
    """The upstream call is over (its status was read, or its connection broke): nothing left to cancel."""
    queued: int = 0
    written: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    """Set after every upstream write, so ``Proxy.flush`` can wait for a position in the outbox."""
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    """Set at the first response: istiod has processed the first request (and registered the VM)."""
    dialed_at: float | None = None

    def finish(self, side: str, code: Status, details: str) -> None:
        # The first cause wins: once one side ended, the other side's errors are consequences.
        if self.end is None:
            self.end = _End(side, code, details)
        self.ended.set()
        self.progress.set()

    def send_control(self, message: bytes) -> None:
        self.queued += 1
        self.outbox.put_nowait((message, False))

    def forward(self, message: bytes) -> None:
        self.queued += 1
        self.outbox.put_nowait((message, True))

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "flavour": self.flavour.value,
            "opened_at": self.opened_at,
            "initial_requests_sent": self.initial_sent,
            "upstream": self.upstream_state,
            "requests": self.requests,
            "responses": self.responses,
        }


class Proxy:
    """Serves ADS to Envoy on ``settings.socket_path`` and relays it to the discovery server."""

    def __init__(
        self,
        settings: XdsSettings,
        *,
        client_cert: ClientCertProvider | None,
        on_name_table: NameTableHandler | None,
        rewrite_response: ResponseRewriter | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: the xDS socket already listening (``vm_agent.sockets.listen_xds``), else ``run()`` binds it."""
        self._settings = settings
        self._rewrite = rewrite_response
        self._client_cert = client_cert
        self._on_name_table = on_name_table
        self.ready = asyncio.Event()
        self._ids = itertools.count(1)
        self._streams: dict[int, _Stream] = {}
        self._registered: _Stream | None = None
        self._types: dict[str, _TypeState] = {}
        self._reporter = HealthReporter(settings.health)
        self._witness = EdsWitness(settings.instance_ip) if settings.instance_ip else None
        self._pacer = DialPacer(settings.pacing)
        self._hold = EndpointHold(settings.endpoint_hold_s)
        self._upstream_lost = False
        self._streams_total = 0
        self._last_disconnect: dict[str, Any] | None = None
        self._last_connected_at: float | None = None
        self._stopping = False
        self._sock = sock

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        path = self._settings.socket_path
        self._stopping = False
        server = None
        try:
            server = await ads_server(path, self.serve_stream, sock=self._sock)
            log.info("xDS proxy listening on %s, upstream %s", path, self._settings.upstream.address)
            self.ready.set()
            await asyncio.Event().wait()
        finally:
            self.ready.clear()
            self._stopping = True
            if server is not None:
                await asyncio.shield(server.stop())
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def report_health(self, event: HealthEvent) -> None:
        """The checker's latest state: sent now when a stream can carry it, kept for the next stream."""
        self._reporter.update(event)

    async def flush(self, within_s: float) -> bool:
        """Wait until everything queued so far on the registered stream (a last health report before
        shutdown, say) has been handed to the upstream connection. False if that did not happen in time
        or there is no stream istiod has answered yet to send on.
        """
        stream = self._registered
        if stream is None or not stream.answered.is_set():
            return False
        target = stream.queued

        async def drained() -> None:
            while stream.written < target and not stream.ended.is_set():
                stream.progress.clear()
                await stream.progress.wait()

        try:
            await asyncio.wait_for(drained(), within_s)
        except TimeoutError:
            return False
        return stream.written >= target

    def snapshot(self) -> dict[str, Any]:
        live = [s for s in self._streams.values() if s.upstream_state == "streaming"]
        if live:
            upstream = "connected"
        elif self._streams:
            upstream = "connecting"
        else:
            upstream = "idle"
        return {
            "socket": str(self._settings.socket_path),
            "ready": self.ready.is_set(),
            "upstream": {
                "address": self._settings.upstream.address,
                "state": upstream,
                "last_connected_at": self._last_connected_at,
                "last_disconnect": self._last_disconnect,
            },
            "streams": {
                "total": self._streams_total,
                "active": [s.as_dict() for s in self._streams.values()],
            },
            "types": {url: st.as_dict() for url, st in sorted(self._types.items())},
            "dials": {
                "total": self._pacer.dials,
                "failed_in_a_row": self._pacer.failures,
                "next_dial_in_s": round(self._pacer.delay(), 3),
                "recent_gaps_s": self._pacer.recent_gaps(),
            },
            "health": {
                **self._reporter.snapshot(),
                "eds_clusters": sorted(self._witness.clusters) if self._witness else [],
            },
        }

    # ------------------------------------------------------------------ one stream

    async def serve_stream(self, flavour: Flavour, downstream: Downstream) -> None:
        """Proxy one downstream stream (Envoy's, or a simulated VM's) to a fresh upstream stream."""
        stream = _Stream(id=next(self._ids), flavour=flavour, opened_at=time.time())
        self._streams_total += 1
        metrics.STREAMS.labels(flavour.value).inc()
        previous, self._registered = self._registered, stream
        if previous is not None and not previous.ended.is_set():
            log.info("stream %d replaces stream %d; closing the older one", stream.id, previous.id)
            previous.finish("agent", Status.UNAVAILABLE, "replaced by a newer xDS stream")
        self._streams[stream.id] = stream
        metrics.ACTIVE.inc()
        log.info("Envoy opened %s stream %d", flavour.value, stream.id)
        channel: Any = None
        try:
            try:
                if await self._dial_slot(stream):
                    channel = open_channel(self._settings.upstream, self._client_cert, codec=RawCodec())
            except UpstreamError as exc:
                stream.finish("upstream", Status.UNAVAILABLE, str(exc))
            except Exception as exc:  # e.g. a client certificate TLS cannot load
                log.exception("stream %d: cannot dial %s", stream.id, self._settings.upstream.address)
                stream.finish("upstream", Status.UNAVAILABLE, f"cannot dial the discovery server: {exc}")
            if channel is not None:
                await self._relay(stream, downstream, channel)
            end = stream.end or _End("downstream", Status.OK, "")
            self._record_end(stream, end)
            if end.code is not Status.OK:
                downstream.end(end.code, end.details)
        except asyncio.CancelledError:
            # Envoy cancelled the RPC (or the server is stopping): the gRPC server cancels this handler.
            if self._stopping:
                stream.finish("agent", Status.UNAVAILABLE, "the agent is shutting down")
            else:
                stream.finish("downstream", Status.CANCELLED, "Envoy cancelled the stream")
            self._record_end(stream, stream.end or _End("downstream", Status.CANCELLED, ""))
            raise
        except Exception:
            # A bug in this stream's handling: end this stream loudly, keep serving the others.
            log.exception("stream %d: internal error in the xDS proxy", stream.id)
            end = _End("agent", Status.INTERNAL, "internal error in the xDS proxy")
            self._record_end(stream, end)
            downstream.end(end.code, end.details)
        finally:
            stream.ended.set()
            stream.progress.set()
            if stream.upstream_state == "streaming":
                metrics.UPSTREAM_UP.dec()
            stream.upstream_state = "ended"
            if channel is not None:
                channel.close()
            self._streams.pop(stream.id, None)
            if self._registered is stream:
                self._registered = None
            metrics.ACTIVE.dec()
            self._paced(stream)

    async def _relay(self, stream: _Stream, downstream: Downstream, channel: Any) -> None:
        """Open the upstream twin of ``stream`` and pump both directions until either side ends it."""
        method = f"/{ADS_SERVICE}/{METHODS[stream.flavour]}"
        md = call_metadata(self._settings.upstream)
        # Every way out of the block below has ended the stream: what grpclib raises while closing the upstream
        # call (its status was recorded already) is not news.
        with contextlib.suppress(GRPCError, *_UPSTREAM_IO_ERRORS):
            async with channel.request(method, Cardinality.STREAM_STREAM, bytes, bytes, metadata=md) as call:
                try:
                    await call.send_request()
                except _UPSTREAM_IO_ERRORS as exc:
                    stream.finish("upstream", Status.UNAVAILABLE, f"cannot reach the discovery server: {exc}")
                    return
                try:
                    async with asyncio.TaskGroup() as tg:
                        tasks = [
                            tg.create_task(self._pump_requests(stream, downstream)),
                            tg.create_task(self._write_upstream(stream, call)),
                            tg.create_task(self._pump_responses(stream, call, downstream)),
                            tg.create_task(self._report_health(stream)),
                            tg.create_task(
                                self._hold.release_when_due(downstream.write, delta=stream.flavour is Flavour.DELTA)
                            ),
                        ]
                        await stream.ended.wait()
                        for task in tasks:
                            task.cancel()
                finally:
                    if not stream.upstream_closed:
                        await asyncio.shield(call.cancel())

    async def _dial_slot(self, stream: _Stream) -> bool:
        """Wait until the pacer lets this stream dial; False when the stream ended (was replaced) meanwhile."""
        after = "first" if self._pacer.dials == 0 else ("failed" if self._pacer.failures else "worked")
        while (delay := self._pacer.delay()) > 0:
            log.info(
                "stream %d: dialing %s in %.1fs (%d failed dials in a row)",
                stream.id,
                self._settings.upstream.address,
                delay,
                self._pacer.failures,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stream.ended.wait(), delay)
            if stream.ended.is_set():
                return False
        self._pacer.dialing()
        metrics.DIALS.labels(after).inc()
        stream.dialed_at = time.monotonic()
        return True

    def _paced(self, stream: _Stream) -> None:
        if stream.dialed_at is None:
            return
        end = stream.end or _End("downstream", Status.OK, "")
        wait = self._pacer.ended(
            responded=stream.responses > 0,
            lived_s=time.monotonic() - stream.dialed_at,
            upstream_ended=end.side == "upstream",
        )
        metrics.DIAL_BACKOFF.set(wait)
        if wait > 0:
            shedding = " (istiod is shedding load)" if end.code is Status.RESOURCE_EXHAUSTED else ""
            log.info("stream %d did not work%s; the next dial waits %.1fs", stream.id, shedding, wait)

    def _record_end(self, stream: _Stream, end: _End) -> None:
        reason = classify(end.code)
        if end.side == "upstream":
            self._upstream_lost = True
        metrics.DISCONNECTS.labels(end.side, end.code.name, reason).inc()
        self._last_disconnect = {
            "at": time.time(),
            "stream": stream.id,
            "side": end.side,
            "code": end.code.name,
            "details": end.details,
            "reason": reason,
        }
        if end.side == "upstream" and reason == "unexpected":
            log.warning(
                "upstream %s ended stream %d: %s %s",
                self._settings.upstream.address,
                stream.id,
                end.code.name,
                end.details,
            )
        else:
            log.info("stream %d ended by %s: %s %s", stream.id, end.side, end.code.name, end.details)

    async def _pump_requests(self, stream: _Stream, downstream: Downstream) -> None:
        """Envoy → outbox, in order; injects the NDS subscription after the first LDS request."""
        limit = self._settings.max_downstream_message_bytes
        while True:
            await stream.credits.acquire()
            message = await downstream.read()
            if message is None:
                if downstream.cancelled():
                    stream.finish("downstream", Status.CANCELLED, "Envoy cancelled the stream")
                else:
                    stream.finish("downstream", Status.OK, "Envoy closed the stream")
                return
            if len(message) > limit:
                stream.finish(
                    "downstream",
                    Status.RESOURCE_EXHAUSTED,
                    f"request of {len(message)} bytes from Envoy is larger than the {limit} bytes allowed",
                )
                return
            try:
                head = peek_request(message, stream.flavour)
            except WireError as exc:
                stream.finish("downstream", Status.INVALID_ARGUMENT, f"malformed request from Envoy: {exc}")
                return
            stream.requests += 1
            if head.response_nonce:
                self._record_ack(head.type_url, head.error_message, "envoy")
            if head.response_nonce.startswith(NONCE_PREFIX):
                # Envoy answering a response the agent sent itself (endpoint_hold): istiod never saw that nonce.
                stream.credits.release()
                continue
            stream.forward(message)
            if not stream.initial_sent and head.type_url == LISTENER_TYPE_URL:
                if self._settings.dns_enabled:
                    stream.send_control(build_request(stream.flavour, NAME_TABLE_TYPE_URL))
                stream.initial_sent = True

    async def _write_upstream(self, stream: _Stream, call: Upstream) -> None:
        while True:
            message, from_envoy = await stream.outbox.get()
            try:
                await call.send_message(message)
            except _UPSTREAM_IO_ERRORS as exc:
                # The upstream call is over; the response pump reports how, if it can tell.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stream.ended.wait(), 1.0)
                stream.finish("upstream", Status.UNAVAILABLE, f"writing to the discovery server failed: {exc}")
                return
            stream.written += 1
            stream.progress.set()
            if from_envoy:
                stream.credits.release()

    async def _upstream_status(self, call: Upstream) -> tuple[Status, str]:
        """How the upstream ended a stream that delivered its last message (grpclib reads the status once our
        side is ended too)."""
        try:
            with contextlib.suppress(*_UPSTREAM_IO_ERRORS):
                await call.end()
            await call.recv_trailing_metadata()
        except GRPCError as exc:
            return exc.status, exc.message or ""
        except _UPSTREAM_IO_ERRORS as exc:
            return Status.UNAVAILABLE, f"upstream stream broke: {exc}"
        return Status.OK, "upstream closed the stream"

    async def _pump_responses(self, stream: _Stream, call: Upstream, downstream: Downstream) -> None:
        while True:
            try:
                message = await call.recv_message()
            except GRPCError as exc:
                stream.upstream_closed = True
                stream.finish("upstream", exc.status, exc.message or "")
                return
            except _UPSTREAM_IO_ERRORS as exc:
                stream.upstream_closed = True
                stream.finish("upstream", Status.UNAVAILABLE, f"upstream stream broke: {exc}")
                return
            if message is None:
                status, details = await self._upstream_status(call)
                stream.upstream_closed = True
                stream.finish("upstream", status, details)
                return
            assert isinstance(message, bytes)
            if stream.upstream_state != "streaming":
                stream.upstream_state = "streaming"
                self._last_connected_at = time.time()
                metrics.UPSTREAM_UP.inc()
                if self._upstream_lost:
                    self._upstream_lost = False
                    self._hold.reconnected()
            try:
                head = peek_response(message)
            except WireError as exc:
                stream.finish("upstream", Status.INTERNAL, f"malformed response from upstream: {exc}")
                return
            stream.responses += 1
            stream.answered.set()
            metrics.RESPONSE_BYTES.inc(len(message))
            state = self._types.setdefault(head.type_url, _TypeState())
            now = time.time()
            state.responses += 1
            state.bytes += len(message)
            state.last_response_at = now
            state.last_nonce = head.nonce
            state.last_version = head.version
            metrics.LAST_RESPONSE.labels(head.type_url).set(now)
            if head.type_url == NAME_TABLE_TYPE_URL and self._settings.dns_enabled:
                state.consumed += 1
                metrics.RESPONSES.labels(head.type_url, "consumed").inc()
                await self._consume_name_table(stream, message, head.version, head.nonce)
            elif forwardable(head.type_url):
                if head.type_url == ENDPOINT_TYPE_URL:
                    self._witness_eds(stream, message)
                    message = self._hold.forward(message, delta=stream.flavour is Flavour.DELTA)
                state.forwarded += 1
                metrics.RESPONSES.labels(head.type_url, "forwarded").inc()
                if self._rewrite is not None:
                    message = await self._rewrite(message, head.type_url, stream.flavour is Flavour.DELTA)
                try:
                    await downstream.write(message)
                except Exception as exc:  # the downstream went away under us; its handler is ending too
                    log.error("stream %d: dropping %s response, Envoy is gone (%s)", stream.id, head.type_url, exc)
                    stream.finish("downstream", Status.CANCELLED, "Envoy went away")
                    return
            else:
                state.dropped += 1
                metrics.RESPONSES.labels(head.type_url, "dropped").inc()
                log.error("stream %d: dropping response of type %r: not an Envoy type", stream.id, head.type_url)

    async def _consume_name_table(self, stream: _Stream, message: bytes, version: str, nonce: str) -> None:
        """Apply a NameTable response and ACK/NACK it upstream (§5.4); an empty one is ignored unACKed."""
        error: str | None = None
        try:
            payload = first_resource(message, stream.flavour)
        except WireError as exc:
            payload = None
            error = f"cannot decode NameTable response: {exc}"
        if payload is None and error is None:
            log.debug("stream %d: empty NameTable response, not ACKed", stream.id)
            return
        if payload is not None:
            type_url, value = payload
            table = nds_pb2.NameTable()
            try:
                if type_url != NAME_TABLE_TYPE_URL:
                    raise ValueError(f"NameTable response holds a {type_url!r} resource")
                table.ParseFromString(value)
                if self._on_name_table is not None:
                    await self._on_name_table(table)
            except (ValueError, DecodeError) as exc:
                error = str(exc) or type(exc).__name__
            except Exception as exc:
                # A bug in the DNS side must not cut Envoy off from xDS: NACK, keep the stream, log loudly.
                log.exception("stream %d: applying the NameTable failed", stream.id)
                error = f"internal error applying the NameTable: {type(exc).__name__}: {exc}"
        if error is not None:
            log.warning("stream %d: NACK NameTable nonce %s: %s", stream.id, nonce, error)
        stream.send_control(
            build_request(
                stream.flavour,
                NAME_TABLE_TYPE_URL,
                version_info=version,
                response_nonce=nonce,
                error=None if error is None else (INTERNAL, error),
            )
        )
        self._record_ack(NAME_TABLE_TYPE_URL, error, "agent")

    def _record_ack(self, type_url: str, error: str | None, sender: str) -> None:
        state = self._types.setdefault(type_url, _TypeState())
        now = time.time()
        if error is None:
            state.acks += 1
            state.last_ack_at = now
            metrics.ACKS.labels(type_url, "ack", sender).inc()
        else:
            state.nacks += 1
            state.last_nack_at = now
            state.last_nack_message = error
            metrics.ACKS.labels(type_url, "nack", sender).inc()

    def _witness_eds(self, stream: _Stream, message: bytes) -> None:
        if self._witness is None or self._registered is not stream:
            return
        serving = self._witness.observe(message, stream.flavour)
        if serving is not None:
            self._reporter.observed(serving)

    async def _report_health(self, stream: _Stream) -> None:
        """Carry health reports on this stream once istiod answered its first request (it drops earlier ones)."""
        await stream.answered.wait()
        if self._registered is stream:
            await self._reporter.serve(lambda report: self._send_health(stream, report))

    def _send_health(self, stream: _Stream, report: Report) -> bool:
        if stream.ended.is_set():
            return False
        event = report.event
        error = None if event.healthy else (INTERNAL, event.message)
        stream.send_control(build_request(stream.flavour, HEALTH_INFO_TYPE_URL, error=error))
        log.debug(
            "stream %d: health %s sent (%s)", stream.id, "healthy" if event.healthy else "unhealthy", report.reason
        )
        return True
