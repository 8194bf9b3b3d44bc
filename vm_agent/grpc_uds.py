"""Envoy's two gRPC services on Unix sockets (SDS and the ADS proxy): the listening socket and the server.

The sockets are bound before Envoy starts, while the rest of the agent is still loading: Envoy's first
connections then wait in the listen backlog instead of failing into Envoy's retry backoff (up to 1 s).
"""

from __future__ import annotations

import os
import socket
import stat
import weakref
from collections.abc import Collection
from pathlib import Path
from typing import Any

from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase
from grpclib.encoding.proto import ProtoCodec
from grpclib.protocol import H2Protocol
from grpclib.server import Server

SUN_PATH_MAX = 107
"""Longest Unix socket path Linux accepts (sun_path is 108 bytes with the terminating NUL)."""


def listen_unix(path: Path, *, mode: int, what: str, replace_files: bool = False) -> socket.socket:
    """A listening socket at ``path``: its folder created (0750), a stale socket replaced; any other file is
    refused, or replaced too with ``replace_files``."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ValueError(
            f"{what} socket path {path} is {len(os.fsencode(path))} bytes long; Unix sockets allow at most "
            f"{SUN_PATH_MAX}"
        )
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{what} socket folder {path.parent} cannot be created: {exc.strerror or exc}") from exc
    try:
        if not replace_files and not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(
                f"{what} socket path {path} exists and is not a socket; remove it or choose another path"
            )
        path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, mode)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"{what}: cannot listen on unix socket {path}: {exc.strerror or exc}") from exc
    return sock


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
