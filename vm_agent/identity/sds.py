"""SDS server for Envoy on a Unix socket: secrets ``default`` and ``ROOTCA`` (istio-agent.md §4.7).

Only ``StreamSecrets`` (state of the world) is served, with istiod's ACK/NACK rules per stream. Secrets
not available yet (no certificate so far) are answered as soon as the SecretManager gets one, instead
of failing the stream as istio's agent does, so Envoy's listeners warm up the moment the CA answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from vm_agent.grpc_uds import serve
from vm_agent.identity.manager import DEFAULT, ROOTCA, SecretManager
from vm_agent.identity.settings import IdentitySettings
from vm_agent.logs import get_logger
from vm_agent.metrics import REGISTRY, Counter, Gauge
from vm_agent.sockets import listen_sds

log = get_logger("sds")

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"

SdsStream = Stream[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse]

SDS_CONNECTIONS = Gauge("vm_agent_sds_connections", "Envoy SDS streams open now", registry=REGISTRY)
SDS_PUSHES = Counter("vm_agent_sds_pushes", "SDS responses sent to Envoy", registry=REGISTRY)
SDS_NACKS = Counter("vm_agent_sds_nacks", "SDS responses Envoy rejected", registry=REGISTRY)


@dataclass
class _Stream:
    """One Envoy SDS stream: what it watches, what we last sent, and what is waiting to go out."""

    conn_id: int
    node_id: str | None = None
    watched: set[str] = field(default_factory=set)
    last_nonce: str | None = None
    pending: set[str] = field(default_factory=set)
    """Watched names we owe a response for (e.g. requested before the first certificate)."""
    events: asyncio.Queue[discovery_pb2.DiscoveryRequest | frozenset[str] | None] = field(default_factory=asyncio.Queue)


class SdsServer:
    def __init__(
        self, settings: IdentitySettings, manager: SecretManager, *, sock: socket.socket | None = None
    ) -> None:
        """``sock``: the SDS socket already listening (``vm_agent.sockets.listen_sds``), else ``run()`` binds it."""
        self._settings = settings
        self._manager = manager
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._versions = itertools.count(1)
        self._pushes = 0
        self._nacks = 0
        self._last_nack: str | None = None
        self.serving = asyncio.Event()
        self._sock = sock

    # -- lifecycle --------------------------------------------------------------------------------

    def __mapping__(self) -> dict[str, Handler]:
        prefix = f"/{SERVICE}/"
        request, response = discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse
        return {
            prefix + "StreamSecrets": Handler(self._stream_secrets, Cardinality.STREAM_STREAM, request, response),
            prefix + "DeltaSecrets": Handler(self._unimplemented, Cardinality.STREAM_STREAM, request, response),
            prefix + "FetchSecrets": Handler(self._unimplemented, Cardinality.UNARY_UNARY, request, response),
        }

    async def run(self) -> None:
        unsubscribe = self._manager.subscribe(self._on_change)
        path = self._settings.sds_socket
        server = None
        try:
            if self._sock is None:
                self._sock = listen_sds(self._settings.sds_socket, self._settings.sds_socket_group)
            server = await serve([self], self._sock)
            log.info("SDS serving on %s", path)
            self.serving.set()
            await asyncio.Event().wait()
        finally:
            self.serving.clear()
            unsubscribe()
            # Unlink first: nothing below may be interrupted before the path is gone, and a listening
            # socket keeps working without its name until the server stops.
            with contextlib.suppress(OSError):
                path.unlink()
            if server is not None:
                await asyncio.shield(server.stop())
            elif self._sock is not None:
                self._sock.close()
            self._sock = None

    async def _unimplemented(self, _stream: Any) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, "only StreamSecrets is served")

    def snapshot(self) -> dict[str, Any]:
        return {
            "socket": str(self._settings.sds_socket),
            "serving": self.serving.is_set(),
            "streams": [
                {"node": s.node_id, "watching": sorted(s.watched), "waiting_for": sorted(s.pending)}
                for s in self._streams.values()
            ],
            "pushes": self._pushes,
            "nacks": self._nacks,
            "last_nack": self._last_nack,
        }

    # -- pushes from the SecretManager ------------------------------------------------------------

    def _on_change(self, names: frozenset[str]) -> None:
        for stream in self._streams.values():
            if names & stream.watched or stream.pending:
                stream.events.put_nowait(names)

    # -- one stream -------------------------------------------------------------------------------

    def _secret(self, name: str) -> any_pb2.Any | None:
        svid = self._manager.svid
        if svid is None:
            return None
        if name == DEFAULT:
            secret = secret_pb2.Secret(
                name=DEFAULT,
                tls_certificate=common_pb2.TlsCertificate(
                    certificate_chain={"inline_bytes": svid.chain_pem},
                    private_key={"inline_bytes": svid.key_pem},
                ),
            )
        elif name == ROOTCA:
            secret = secret_pb2.Secret(
                name=ROOTCA,
                validation_context=common_pb2.CertificateValidationContext(
                    trusted_ca={"inline_bytes": self._manager.trust_bundle()}
                ),
            )
        else:
            return None
        packed = any_pb2.Any()
        packed.Pack(secret)
        return packed

    async def _send(self, stream: _Stream, names: set[str], context: SdsStream) -> None:
        """Send what we have of ``names``; anything not available yet stays pending for a later push."""
        resources: list[any_pb2.Any] = []
        for name in sorted(names):
            secret = self._secret(name)
            if secret is None:
                stream.pending.add(name)
            else:
                stream.pending.discard(name)
                resources.append(secret)
        if not resources:
            return
        nonce = str(uuid.uuid4())
        version = f"{datetime.now(UTC).isoformat(timespec='seconds').replace('+00:00', 'Z')}/{next(self._versions)}"
        response = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=SECRET_TYPE_URL, nonce=nonce, resources=resources
        )
        stream.last_nonce = nonce
        await context.send_message(response)
        self._pushes += 1
        SDS_PUSHES.inc()
        log.debug("sent %s to %s (version %s)", ", ".join(sorted(names - stream.pending)), stream.node_id, version)

    async def _on_request(self, stream: _Stream, req: discovery_pb2.DiscoveryRequest, context: SdsStream) -> None:
        names = set(req.resource_names)
        unknown = names - {DEFAULT, ROOTCA}
        if unknown:
            log.warning(
                "Envoy %s asked for unknown secrets %s; only default and ROOTCA are served",
                stream.node_id,
                ", ".join(sorted(unknown)),
            )
        if req.HasField("error_detail"):
            self._nacks += 1
            self._last_nack = req.error_detail.message
            SDS_NACKS.inc()
            log.warning(
                "Envoy %s rejected secrets %s: %s", stream.node_id, ", ".join(sorted(names)), req.error_detail.message
            )
            return
        if not names:
            stream.watched.clear()
            stream.pending.clear()
            return
        if not req.response_nonce or stream.last_nonce is None:
            stream.watched = names
            stream.pending &= names
            await self._send(stream, names, context)
            return
        if req.response_nonce != stream.last_nonce:
            return  # stale: Envoy is answering an older response than our latest
        added = names - stream.watched
        stream.watched = names
        stream.pending &= names
        if added:
            await self._send(stream, added, context)

    async def _stream_secrets(self, context: SdsStream) -> None:
        stream = _Stream(next(self._ids))
        abort: tuple[Status, str] | None = None

        async def read() -> None:
            async for req in context:
                stream.events.put_nowait(req)
            stream.events.put_nowait(None)

        self._streams[stream.conn_id] = stream
        SDS_CONNECTIONS.inc()
        try:
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(read())
                while True:
                    event = await stream.events.get()
                    if event is None:
                        break
                    if isinstance(event, frozenset):
                        due = set(event & stream.watched) | stream.pending
                        if due:
                            await self._send(stream, due, context)
                        continue
                    if stream.node_id is None:
                        if not event.node.id:
                            abort = (Status.INVALID_ARGUMENT, "missing node information")
                            reader.cancel()
                            break
                        stream.node_id = event.node.id
                        log.info("Envoy %s connected for secrets", stream.node_id)
                    await self._on_request(stream, event, context)
        finally:
            del self._streams[stream.conn_id]
            SDS_CONNECTIONS.dec()
        if abort is not None:
            raise GRPCError(*abort)
