"""The gRPC readiness probe (grpc.health.v1 Check), loaded only for a workload whose probe is gRPC."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from typing import Any

from grpc_health.v1 import health_pb2
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol

from vm_agent.config.probe import GrpcAction
from vm_agent.health.probers import dial_error, join_host_port, source_for

_HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


class _ProbeChannel(Channel):
    """A grpclib channel whose connection leaves from a chosen source address (grpcio cannot bind one)."""

    def __init__(
        self, host: str, port: int, *, local_addr: tuple[str, int] | None, family: socket.AddressFamily
    ) -> None:
        super().__init__(host, port)
        self._probe_local_addr = local_addr
        self._probe_family = family

    async def _create_connection(self) -> H2Protocol:
        _, protocol = await asyncio.get_running_loop().create_connection(
            self._protocol_factory,
            self._host,
            self._port,
            family=self._probe_family,
            local_addr=self._probe_local_addr,
        )
        return protocol


_GO_CODE_NAMES = {"CANCELLED": "Canceled", "OK": "OK"}


def _go_code(status: Status) -> str:
    return _GO_CODE_NAMES.get(status.name) or "".join(p.capitalize() for p in status.name.split("_"))


def _rpc_error(status: Status, message: str | None) -> str:
    return f"rpc error: code = {_go_code(status)} desc = {message or ''}"


def _duration(seconds: float) -> str:
    return f"{seconds:g}s" if seconds == math.floor(seconds) else f"{seconds}s"


async def probe_grpc(
    action: GrpcAction, default_host: str, limit: float, source_address: str | None
) -> tuple[bool, str]:
    port = action.port
    host_port = join_host_port(default_host, port)
    deadline = time.monotonic() + limit
    connected = False
    channel: _ProbeChannel | None = None
    try:
        async with asyncio.timeout(limit):
            source, family = await source_for(default_host, source_address)
            channel = _ProbeChannel(default_host, port, local_addr=(source, 0) if source else None, family=family)
            await channel.__connect__()
            connected = True
            check: UnaryUnaryMethod[Any, Any] = UnaryUnaryMethod(
                channel, _HEALTH_CHECK_METHOD, health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
            )
            reply = await check(
                health_pb2.HealthCheckRequest(service=action.service),
                timeout=max(deadline - time.monotonic(), 0.001),
            )
    except TimeoutError:
        if not connected:
            return False, f"failed to connect health check grpc service on port {port}: context deadline exceeded"
        return False, (
            f"health rpc probe timed out after {_duration(limit)}: "
            f"{_rpc_error(Status.DEADLINE_EXCEEDED, 'context deadline exceeded')}"
        )
    except OSError as exc:
        if not connected:
            return False, f"failed to connect health check grpc service on port {port}: {dial_error(host_port, exc)}"
        return False, f"health rpc probe failed with status Unavailable: {_rpc_error(Status.UNAVAILABLE, str(exc))}"
    except GRPCError as exc:
        err = _rpc_error(exc.status, exc.message)
        if exc.status is Status.UNIMPLEMENTED:
            return (
                False,
                f"service on port {port} doesn't implement the grpc health protocol grpc.health.v1.Health: {err}",
            )
        if exc.status is Status.DEADLINE_EXCEEDED:
            return False, f"health rpc probe timed out after {_duration(limit)}: {err}"
        return False, f"health rpc probe failed with status {_go_code(exc.status)}: {err}"
    except (StreamTerminatedError, ProtocolError) as exc:
        return False, f"health rpc probe failed with status Unavailable: {_rpc_error(Status.UNAVAILABLE, str(exc))}"
    finally:
        if channel is not None:
            channel.close()
    status = int(reply.status)
    if status == health_pb2.HealthCheckResponse.SERVING:
        return True, ""
    try:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    except ValueError:
        name = str(status)
    return False, f"grpc health status {name}"
