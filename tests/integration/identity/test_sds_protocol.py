"""The SDS server's stream rules, driven by a plain grpcio client over the real Unix socket."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from tests.unit.identity.ca_server import LocalCAServer
from tests.unit.identity.conftest import identity_settings, make_token, running
from vm_agent.identity.manager import SecretManager
from vm_agent.identity.sds import SECRET_TYPE_URL, SdsServer
from vm_agent.identity.settings import IdentitySettings

pytestmark = pytest.mark.integration

METHOD = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"


@dataclass
class Client:
    call: Any
    responses: asyncio.Queue[discovery_pb2.DiscoveryResponse]
    ended: asyncio.Future[grpc.aio.AioRpcError | None]

    async def send(self, names: list[str], nonce: str = "", node: str = "", error: str | None = None) -> None:
        req = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE_URL, resource_names=names, response_nonce=nonce)
        if node:
            req.node.id = node
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(req)

    async def next(self, timeout: float = 10.0) -> discovery_pb2.DiscoveryResponse:
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def nothing(self, wait: float = 0.4) -> None:
        await asyncio.sleep(wait)
        assert self.responses.empty(), self.responses.get_nowait()


def _names(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for res in resp.resources:
        secret = secret_pb2.Secret()
        assert res.Unpack(secret)
        out.append(secret.name)
    return out


@asynccontextmanager
async def sds_client(settings: IdentitySettings) -> AsyncIterator[Client]:
    async with grpc.aio.insecure_channel(f"unix:{settings.sds_socket}") as channel:
        call = channel.stream_stream(
            METHOD,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        client = Client(call, asyncio.Queue(), asyncio.get_running_loop().create_future())

        async def pump() -> None:
            try:
                while (resp := await call.read()) is not grpc.aio.EOF:
                    client.responses.put_nowait(resp)
            except grpc.aio.AioRpcError as exc:
                client.ended.set_result(exc)
                return
            client.ended.set_result(None)

        task = asyncio.create_task(pump())
        try:
            yield client
        finally:
            call.cancel()
            task.cancel()
            with suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task


@asynccontextmanager
async def running_sds(settings: IdentitySettings, manager: SecretManager) -> AsyncIterator[SdsServer]:
    server = SdsServer(settings, manager)
    task = asyncio.create_task(server.run())
    try:
        await asyncio.wait_for(server.serving.wait(), 10)
        yield server
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def ca_server() -> AsyncIterator[LocalCAServer]:
    async with LocalCAServer() as server:
        yield server


async def test_nonce_ack_nack_rules_and_pushes(tmp_path: Path, ca_server: LocalCAServer) -> None:
    (tmp_path / "istio-token").write_text(make_token())
    settings = identity_settings(tmp_path, ca_server)
    manager = SecretManager(settings)
    async with running(manager), running_sds(settings, manager) as sds, sds_client(settings) as envoy:
        assert stat.S_IMODE(os.stat(settings.sds_socket).st_mode) == 0o660
        await envoy.send(["default"], node="sidecar~10.0.0.1~vm.ns1~ns1.svc.cluster.local")
        first = await envoy.next()
        assert first.type_url == SECRET_TYPE_URL
        assert _names(first) == ["default"]
        assert "/" in first.version_info
        secret = secret_pb2.Secret()
        first.resources[0].Unpack(secret)
        assert manager.svid is not None
        assert secret.tls_certificate.certificate_chain.inline_bytes == manager.svid.chain_pem
        assert secret.tls_certificate.private_key.inline_bytes == manager.svid.key_pem

        await envoy.send(["default"], nonce=first.nonce)  # ACK
        await envoy.nothing()

        await envoy.send(["default", "ROOTCA"], nonce=first.nonce)  # a name added: only that one is sent
        second = await envoy.next()
        assert _names(second) == ["ROOTCA"]
        assert second.nonce != first.nonce
        root = secret_pb2.Secret()
        second.resources[0].Unpack(root)
        assert root.validation_context.trusted_ca.inline_bytes == ca_server.ca.pem

        await envoy.send(["default", "ROOTCA", "other"], nonce=first.nonce)  # stale nonce: ignored
        await envoy.nothing()
        await envoy.send(["default", "ROOTCA"], nonce=second.nonce, error="bad secret")  # NACK: no answer
        await envoy.nothing()
        assert sds.snapshot()["nacks"] == 1
        await envoy.send(["default", "ROOTCA"], nonce=second.nonce)
        await envoy.nothing()

        manager.request_rotation()  # same root: only default is pushed
        pushed = await envoy.next()
        assert _names(pushed) == ["default"]
        pushed_secret = secret_pb2.Secret()
        pushed.resources[0].Unpack(pushed_secret)
        assert (
            pushed_secret.tls_certificate.certificate_chain.inline_bytes
            != secret.tls_certificate.certificate_chain.inline_bytes
        )
        assert pushed.version_info != first.version_info

        await envoy.send([], nonce=pushed.nonce)  # unsubscribe: no more pushes
        await envoy.nothing(0.1)
        manager.request_rotation()
        await envoy.nothing()
        snap = sds.snapshot()
        assert snap["streams"][0]["watching"] == []


async def test_request_before_certificate_is_answered_when_it_arrives(tmp_path: Path, ca_server: LocalCAServer) -> None:
    settings = identity_settings(tmp_path, ca_server)  # no token yet: the CA refuses us
    manager = SecretManager(settings)
    async with running(manager), running_sds(settings, manager), sds_client(settings) as envoy:
        await envoy.send(["default", "ROOTCA"], node="n1")
        await envoy.nothing(0.5)
        (tmp_path / "istio-token").write_text(make_token())
        resp = await envoy.next(15)
        assert sorted(_names(resp)) == ["ROOTCA", "default"]


async def test_first_request_without_node_is_rejected(tmp_path: Path, ca_server: LocalCAServer) -> None:
    (tmp_path / "istio-token").write_text(make_token())
    settings = identity_settings(tmp_path, ca_server)
    manager = SecretManager(settings)
    async with running(manager), running_sds(settings, manager), sds_client(settings) as envoy:
        await envoy.send(["default"])
        err = await asyncio.wait_for(envoy.ended, 10)
        assert err is not None
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "missing node information" in (err.details() or "")


async def test_socket_removed_on_stop_and_stale_socket_replaced(tmp_path: Path, ca_server: LocalCAServer) -> None:
    settings = identity_settings(tmp_path, ca_server)
    settings.sds_socket.parent.mkdir(parents=True)
    settings.sds_socket.write_text("stale")
    manager = SecretManager(settings)
    async with running_sds(settings, manager):
        assert stat.S_ISSOCK(os.stat(settings.sds_socket).st_mode)
    assert not settings.sds_socket.exists()


@pytest.mark.system
@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
async def test_socket_handed_to_envoy_group(tmp_path: Path, ca_server: LocalCAServer) -> None:
    import dataclasses
    import grp

    group = grp.getgrnam("daemon")
    settings = dataclasses.replace(identity_settings(tmp_path, ca_server), sds_socket_group="daemon")
    async with running_sds(settings, SecretManager(settings)):
        st = os.stat(settings.sds_socket)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group.gr_gid
        assert os.stat(settings.sds_socket.parent).st_gid == group.gr_gid
        assert stat.S_IMODE(os.stat(settings.sds_socket.parent).st_mode) == 0o750


async def test_unknown_socket_group_is_named(tmp_path: Path, ca_server: LocalCAServer) -> None:
    import dataclasses

    settings = dataclasses.replace(identity_settings(tmp_path, ca_server), sds_socket_group="no-such-group-xyz")
    with pytest.raises(ValueError, match="no-such-group-xyz"):
        await SdsServer(settings, SecretManager(settings)).run()
    assert not settings.sds_socket.exists()
