"""gRPC readiness probes against a real grpcio server with the standard health service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.net import free_port
from vm_agent.config.probe import GrpcAction
from vm_agent.health import probe_once

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.UNKNOWN
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class RecordingHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The standard Check semantics (NOT_FOUND for an unknown service), recording who asked for what.

    ``delay`` makes Check slow.
    """

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.delay = 0.0

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        metadata = dict(context.invocation_metadata() or ())
        self.calls.append((request.service, context.peer(), str(metadata.get("user-agent", ""))))
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)


@dataclass
class GrpcApp:
    port: int
    servicer: RecordingHealth | None
    server: grpc.aio.Server = field(repr=False)


async def start(with_health: bool) -> GrpcApp:
    port = free_port()
    server = grpc.aio.server()
    servicer = RecordingHealth() if with_health else None
    if servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return GrpcApp(port, servicer, server)


@pytest.fixture
async def app() -> AsyncIterator[GrpcApp]:
    running = await start(with_health=True)
    try:
        yield running
    finally:
        await running.server.stop(grace=None)


async def check(port: int, service: str = "", timeout: float = 2.0, source: str | None = None) -> tuple[bool, str]:
    return await probe_once(
        GrpcAction(port=port, service=service), default_host="127.0.0.1", timeout=timeout, source_address=source
    )


def set_status(app: GrpcApp, service: str, status: int) -> None:
    assert app.servicer is not None
    app.servicer.statuses[service] = status


async def test_serving_is_healthy_and_sends_the_service_name(app: GrpcApp) -> None:
    set_status(app, "reviews.v1", SERVING)
    assert await check(app.port, "reviews.v1") == (True, "")
    assert app.servicer is not None
    assert [c[0] for c in app.servicer.calls] == ["reviews.v1"]


@pytest.mark.parametrize(
    ("status", "name"), [(NOT_SERVING, "NOT_SERVING"), (UNKNOWN, "UNKNOWN"), (SERVICE_UNKNOWN, "SERVICE_UNKNOWN")]
)
async def test_non_serving_replies_are_unhealthy_with_the_status(app: GrpcApp, status: int, name: str) -> None:
    set_status(app, "svc", status)
    assert await check(app.port, "svc") == (False, f"grpc health status {name}")


async def test_serving_then_not_serving_follows_the_server(app: GrpcApp) -> None:
    set_status(app, "", SERVING)
    assert await check(app.port) == (True, "")
    set_status(app, "", NOT_SERVING)
    assert await check(app.port) == (False, "grpc health status NOT_SERVING")


async def test_unregistered_service_is_not_found(app: GrpcApp) -> None:
    ok, message = await check(app.port, "nobody")
    assert not ok
    assert message == "health rpc probe failed with status NotFound: rpc error: code = NotFound desc = unknown service"


async def test_server_without_health_service_is_unimplemented() -> None:
    bare = await start(with_health=False)
    try:
        ok, message = await check(bare.port)
    finally:
        await bare.server.stop(grace=None)
    assert not ok
    assert message.startswith(
        f"service on port {bare.port} doesn't implement the grpc health protocol grpc.health.v1.Health: "
        "rpc error: code = Unimplemented desc = "
    )


async def test_wrong_port_fails_to_connect() -> None:
    port = free_port()
    assert await check(port) == (
        False,
        f"failed to connect health check grpc service on port {port}: "
        f"dial tcp 127.0.0.1:{port}: connect: connection refused",
    )


async def test_slow_check_times_out(app: GrpcApp) -> None:
    set_status(app, "", SERVING)
    assert app.servicer is not None
    app.servicer.delay = 2.0
    ok, message = await check(app.port, timeout=0.5)
    assert not ok
    assert message.startswith("health rpc probe timed out after 0.5s: rpc error: code = DeadlineExceeded")


async def test_grpc_probe_leaves_from_source_address(app: GrpcApp) -> None:
    set_status(app, "", SERVING)
    assert await check(app.port, source="127.0.0.6") == (True, "")
    assert await check(app.port, source=None) == (True, "")
    assert app.servicer is not None
    peers = [c[1] for c in app.servicer.calls]
    assert peers[0].startswith("ipv4:127.0.0.6:")
    assert peers[1].startswith("ipv4:127.0.0.1:")
