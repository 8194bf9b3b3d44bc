"""A small TLS ADS server (grpcio) standing in for istiod in the xDS proxy tests.

It serves SotW and Delta ADS with a real state of the world per type (so a real Envoy warms up on it),
records every stream's metadata, peer certificate and requests, and lets a test push any raw response.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
import grpc.aio
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

# discovery_pb2.(Delta)DiscoveryRequest / Response; xds-protos ships no type stubs.
Request: TypeAlias = Any
Response: TypeAlias = Any


@dataclass
class AdsStream:
    delta: bool
    metadata: dict[str, str]
    peer_cert_pem: bytes | None
    requests: list[Request] = field(default_factory=list)
    outbox: asyncio.Queue[Response | None] = field(default_factory=asyncio.Queue)
    subscribed: set[str] = field(default_factory=set)
    sent_names: dict[str, set[str]] = field(default_factory=dict)
    nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    done: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever a request arrives (the benchmark clears it and waits for an ACK)."""

    def next_nonce(self) -> str:
        return f"n{next(self.nonces)}"

    def push(self, response: Response) -> str:
        """Queue a raw response (its nonce is set if empty) and return the nonce."""
        if not response.nonce:
            response.nonce = self.next_nonce()
        self.outbox.put_nowait(response)
        return str(response.nonce)

    def requests_of(self, type_url: str) -> list[Request]:
        return [r for r in self.requests if r.type_url == type_url]

    def close(self) -> None:
        self.outbox.put_nowait(None)


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class AdsServer:
    def __init__(self, server_key_pem: bytes, server_cert_pem: bytes, client_root_pem: bytes | None, port: int) -> None:
        """``client_root_pem`` set means client certificates are required and verified against it."""
        self._creds = grpc.ssl_server_credentials(
            [(server_key_pem, server_cert_pem)],
            root_certificates=client_root_pem,
            require_client_auth=client_root_pem is not None,
        )
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.streams: list[AdsStream] = []
        self.resources: dict[str, dict[str, Message]] = {CDS: {}, LDS: {}}
        self.version = 1
        self.held: set[str] = set()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=discovery_pb2.DeltaDiscoveryResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        bound = server.add_secure_port(self.address, self._creds)
        assert bound == self.port, f"could not bind {self.address}"
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            for s in self.streams:
                s.done = True
            await self._server.stop(None)
            self._server = None

    # ------------------------------------------------------------------ test controls

    @property
    def live(self) -> list[AdsStream]:
        return [s for s in self.streams if not s.done]

    def set_resources(self, type_url: str, resources: Iterable[tuple[str, Message]]) -> None:
        """Replace the state of one type and push it to every live stream subscribed to it."""
        self.resources[type_url] = dict(resources)
        self.version += 1
        for stream in self.live:
            if type_url in stream.subscribed and type_url not in self.held:
                self._send_state(stream, type_url)

    def release(self, type_url: str) -> None:
        self.held.discard(type_url)
        for stream in self.live:
            if type_url in stream.subscribed:
                self._send_state(stream, type_url)

    async def wait_for(self, check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            await asyncio.sleep(0.05)
        raise TimeoutError(f"ADS server: timed out after {timeout}s waiting for {what}")

    async def wait_stream(self, count: int = 1, timeout: float = 20.0) -> AdsStream:
        await self.wait_for(lambda: len(self.streams) >= count, timeout, f"{count} stream(s)")
        return self.streams[count - 1]

    # ------------------------------------------------------------------ serving

    def _send_state(self, stream: AdsStream, type_url: str) -> None:
        state = self.resources.get(type_url, {})
        version = f"v{self.version}"
        if stream.delta:
            old = stream.sent_names.get(type_url, set())
            stream.push(
                discovery_pb2.DeltaDiscoveryResponse(
                    type_url=type_url,
                    system_version_info=version,
                    resources=[
                        discovery_pb2.Resource(name=name, version=version, resource=pack(msg))
                        for name, msg in state.items()
                    ],
                    removed_resources=sorted(old - set(state)),
                )
            )
        else:
            stream.push(
                discovery_pb2.DiscoveryResponse(
                    type_url=type_url, version_info=version, resources=[pack(m) for m in state.values()]
                )
            )
        stream.sent_names[type_url] = set(state)

    def _open(self, delta: bool, context: grpc.aio.ServicerContext[Any, Any]) -> AdsStream:
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        certs = context.auth_context().get("x509_pem_cert") or [None]
        stream = AdsStream(delta=delta, metadata=md, peer_cert_pem=certs[0])
        self.streams.append(stream)
        return stream

    async def _serve(self, stream: AdsStream, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        async def reader() -> None:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    stream.close()
                    return
                stream.requests.append(req)
                stream.arrived.set()
                if req.type_url in self.resources and req.type_url not in stream.subscribed:
                    stream.subscribed.add(req.type_url)
                    if req.type_url not in self.held:
                        self._send_state(stream, req.type_url)

        task = asyncio.create_task(reader())
        try:
            while True:
                response = await stream.outbox.get()
                if response is None:
                    return
                await context.write(response)
        finally:
            stream.done = True
            task.cancel()

    async def _sotw(self, _it: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(self._open(False, context), context)

    async def _delta(self, _it: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(self._open(True, context), context)
