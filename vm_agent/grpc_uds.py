"""The gRPC server behind Envoy's two Unix sockets (SDS and the ADS proxy); ``vm_agent.sockets`` binds them."""

from __future__ import annotations

import socket
import weakref
from collections.abc import Collection
from typing import Any

from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase
from grpclib.encoding.proto import ProtoCodec
from grpclib.protocol import H2Protocol
from grpclib.server import Server

KEEPALIVE_TIME_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0


class UdsServer(Server):
    """A grpclib server whose ``stop()`` also closes the connections (grpclib only cancels their handlers)."""

    def __init__(self, handlers: Collection[Any], codec: CodecBase | None = None) -> None:
        # An explicit codec also keeps grpclib from loading googleapis' status protos for error details.
        # It pings an idle Envoy every 30 s and drops a connection that does not answer within 10 s.
        super().__init__(
            list(handlers),
            codec=codec or ProtoCodec(),
            config=Configuration(_keepalive_time=KEEPALIVE_TIME_S, _keepalive_timeout=KEEPALIVE_TIMEOUT_S),
        )
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        self._protocols.add(protocol)
        return protocol

    async def stop(self) -> None:
        self.close()
        await self.wait_closed()
        for protocol in list(self._protocols):
            connection = getattr(protocol, "connection", None)
            if connection is not None:
                connection.close()


async def serve(handlers: Collection[Any], sock: socket.socket, codec: CodecBase | None = None) -> UdsServer:
    """A gRPC server for ``handlers`` accepting on the listening ``sock``."""
    server = UdsServer(handlers, codec)
    await server.start(sock=sock)
    return server
