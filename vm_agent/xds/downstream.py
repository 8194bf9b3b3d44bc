"""Envoy's side of the proxy: the ADS server on a Unix socket, and the ``Downstream`` a stream talks to.

The proxy's stream logic only needs four things from whoever sits downstream: read the next request,
write a response, tell a cancel from a clean close, and end the stream with a status. ``EnvoyDownstream``
provides them over a grpclib server stream; the fleet simulator (bench/fleet) provides them without any
Envoy, so that simulated VMs run the agent's own upstream, NDS and health code.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from vm_agent.grpc_uds import UdsServer, serve
from vm_agent.sockets import listen_xds
from vm_agent.upstream import RawCodec
from vm_agent.xds.wire import Flavour

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
METHODS = {Flavour.SOTW: "StreamAggregatedResources", Flavour.DELTA: "DeltaAggregatedResources"}


class Downstream(Protocol):
    async def read(self) -> bytes | None:
        """The next request; ``None`` once the downstream closed or cancelled the stream."""

    def cancelled(self) -> bool:
        """After ``read`` returned ``None``: whether that was a cancel rather than a clean close."""

    async def write(self, message: bytes) -> None:
        """Hand one response to the downstream; raises when it went away."""

    def end(self, code: Status, details: str) -> None:
        """The status the stream ends with (set before the stream's handler returns)."""


class EnvoyDownstream:
    """A ``Downstream`` over one of Envoy's ADS streams (grpclib cancels the handler when Envoy cancels)."""

    def __init__(self, stream: Stream[bytes, bytes]) -> None:
        self._stream = stream
        self.status: tuple[Status, str] | None = None

    async def read(self) -> bytes | None:
        message = await self._stream.recv_message()
        assert message is None or isinstance(message, bytes)
        return message

    def cancelled(self) -> bool:
        return False  # a cancel never reads as the end of the requests: it cancels the handler

    async def write(self, message: bytes) -> None:
        await self._stream.send_message(message)

    def end(self, code: Status, details: str) -> None:
        self.status = (code, details)


StreamHandler = Callable[[Flavour, Downstream], Awaitable[None]]


class _AdsService:
    def __init__(self, handler: StreamHandler) -> None:
        self._handler = handler

    def __mapping__(self) -> dict[str, Handler]:
        return {
            f"/{ADS_SERVICE}/{method}": Handler(self._behaviour(flavour), Cardinality.STREAM_STREAM, bytes, bytes)
            for flavour, method in METHODS.items()
        }

    def _behaviour(self, flavour: Flavour) -> Callable[[Stream[bytes, bytes]], Awaitable[None]]:
        async def serve_one(stream: Stream[bytes, bytes]) -> None:
            downstream = EnvoyDownstream(stream)
            await self._handler(flavour, downstream)
            if downstream.status is not None and downstream.status[0] is not Status.OK:
                raise GRPCError(*downstream.status)

        return serve_one


async def ads_server(path: Path, handler: StreamHandler, *, sock: socket.socket | None = None) -> UdsServer:
    """An ADS server (SotW and Delta) on the Unix socket ``path`` (or the already listening ``sock``: the agent
    binds it before Envoy starts), each stream handed to ``handler``."""
    return await serve([_AdsService(handler)], sock if sock is not None else listen_xds(path), codec=RawCodec())
