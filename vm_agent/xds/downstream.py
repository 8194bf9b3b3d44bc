"""Envoy's side of the proxy: the ADS server on a Unix socket, and the ``Downstream`` a stream talks to.

The proxy's stream logic only needs four things from whoever sits downstream: read the next request,
write a response, tell a cancel from a clean close, and end the stream with a status. ``EnvoyDownstream``
provides them over a gRPC servicer context; the fleet simulator (bench/fleet) provides them without any
Envoy, so that simulated VMs run the agent's own upstream, NDS and health code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio

from vm_agent.xds.wire import Flavour

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
METHODS = {Flavour.SOTW: "StreamAggregatedResources", Flavour.DELTA: "DeltaAggregatedResources"}
SOCKET_MODE = 0o660
"""Istio uses 0666; only Envoy (same user or group) has any business on this socket."""
_SUN_PATH_MAX = 107
"""Longest Unix socket path Linux accepts (sun_path is 108 bytes with the terminating NUL)."""


class Downstream(Protocol):
    async def read(self) -> bytes | None:
        """The next request; ``None`` once the downstream closed or cancelled the stream."""

    def cancelled(self) -> bool:
        """After ``read`` returned ``None``: whether that was a cancel rather than a clean close."""

    async def write(self, message: bytes) -> None:
        """Hand one response to the downstream; raises when it went away."""

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """The status the stream ends with (set before the stream's handler returns)."""


class EnvoyDownstream:
    """A ``Downstream`` over the servicer context of one of Envoy's ADS streams."""

    def __init__(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        self._context = context

    async def read(self) -> bytes | None:
        message = await self._context.read()
        if message is grpc.aio.EOF:
            # A cancel (Envoy's usual way out) also reads as EOF; the cancel flag lands a moment later.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_until_done(self._context), 0.05)
            return None
        assert isinstance(message, bytes)
        return message

    def cancelled(self) -> bool:
        return bool(self._context.cancelled())

    async def write(self, message: bytes) -> None:
        await self._context.write(message)

    def end(self, code: grpc.StatusCode, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)


async def _until_done(context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
    # grpc.aio gives a servicer no awaitable for "the RPC is over", only the done() flag.
    while not context.done():  # noqa: ASYNC110
        await asyncio.sleep(0.005)


StreamHandler = Callable[[Flavour, Downstream], Awaitable[None]]


def ads_server(path: Path, max_receive_bytes: int, handler: StreamHandler) -> grpc.aio.Server:
    """An ADS server (SotW and Delta) on the Unix socket ``path``, each stream handed to ``handler``."""
    _prepare_socket_path(path)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_concurrent_streams", 100_000),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # Istio enforces a 15 s minimum between client pings (half its 30 s keepalive time).
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 15_000),
        ]
    )

    def behaviour(flavour: Flavour) -> Callable[[Any, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[None]]:
        async def serve(_requests: Any, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
            await handler(flavour, EnvoyDownstream(context))

        return serve

    handlers = {
        method: grpc.stream_stream_rpc_method_handler(behaviour(flavour)) for flavour, method in METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),))
    try:
        bound = server.add_insecure_port(f"unix:{path}")
    except RuntimeError as exc:  # grpcio reports bind failures this way
        raise OSError(f"xDS proxy: cannot listen on unix socket {path}: {exc}") from exc
    if not bound:
        raise OSError(f"xDS proxy: cannot listen on unix socket {path}")
    return server


def _prepare_socket_path(path: Path) -> None:
    """Create the parent folder (0750) and remove a stale socket; refuse to delete anything else."""
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ValueError(
            f"xDS socket path {path} is {len(os.fsencode(path))} bytes long; Unix sockets allow at most {_SUN_PATH_MAX}"
        )
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"xDS socket folder {path.parent} cannot be created: {exc.strerror or exc}") from exc
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"xDS socket path {path} exists and is not a socket; remove it or choose another path")
    path.unlink()
