"""The agent's own building blocks, driven directly against real istiod.

Used to pin istiod's behaviour independently of the composition root: the node, metadata, upstream
settings and CSR all come from vm-agent's config loader and identity code, so a difference found here is a
difference in vm-agent, not in a test double.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError

from vm_agent.config import Config, Options, load
from vm_agent.identity.ca_client import CaClient
from vm_agent.identity.csr import generate_key_and_csr, spiffe_id
from vm_agent.upstream import UpstreamSettings, call_metadata, open_channel

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
NDS = "type.googleapis.com/istio.networking.nds.v1.NameTable"
HEALTH = "type.googleapis.com/istio.v1.HealthInformation"


def load_config(config_dir: Path, state_dir: Path, resolv_conf: Path, extra: Mapping[str, str]) -> Config:
    return load(
        Options(
            config_dir=config_dir,
            state_dir=state_dir,
            resolv_conf=resolv_conf,
            scan_interfaces=False,
            extra_env=dict(extra),
        )
    )


def upstream(cfg: Config, *, for_ca: bool, token_path: Path | None = None) -> UpstreamSettings:
    up = cfg.ca if for_ca else cfg.discovery
    return UpstreamSettings(
        address=up.address,
        dial_target=up.dial_target,
        server_name=up.server_name,
        root_cert_path=up.root_cert,
        token_path=token_path if token_path is not None else cfg.paths.token,
        cluster_id=cfg.identity.cluster_id,
        extra_metadata=up.extra_metadata,
        plaintext=up.plaintext,
    )


async def issue_svid(
    cfg: Config, *, token_path: Path | None = None, client_cert: tuple[bytes, bytes] | None = None
) -> tuple[bytes, list[str]]:
    """(key PEM, cert chain) from istiod's CA for the config's SPIFFE ID; ``CaError`` when refused."""
    ident = cfg.identity
    key, csr = generate_key_and_csr(spiffe_id(ident.trust_domain, ident.namespace, ident.service_account))
    client = CaClient(
        upstream(cfg, for_ca=True, token_path=token_path),
        (lambda: client_cert) if client_cert is not None else None,
        attempts=1,
    )
    chain = await client.create_certificate(csr, 3600)
    return key, list(chain)


def node_of(cfg: Config) -> base_pb2.Node:
    md = struct_pb2.Struct()
    md.update(dict(cfg.node.metadata))
    node = base_pb2.Node(id=cfg.node.id, cluster=cfg.node.cluster, metadata=md)
    return node


class AdsSession:
    """One ADS stream to istiod, as the agent's upstream leg would open it (mTLS with the SVID + token)."""

    def __init__(self, cfg: Config, key_pem: bytes, chain_pem: bytes) -> None:
        self._cfg = cfg
        self._settings = upstream(cfg, for_ca=False)
        self._pair = (key_pem, chain_pem)
        self._out: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self._stack = contextlib.AsyncExitStack()
        self._call: Any = None
        self._sender: asyncio.Task[None] | None = None
        self._first = True

    async def __aenter__(self) -> AdsSession:
        channel = open_channel(self._settings, lambda: self._pair)
        self._stack.callback(channel.close)
        self._call = await self._stack.enter_async_context(
            channel.request(
                ADS_METHOD,
                Cardinality.STREAM_STREAM,
                discovery_pb2.DiscoveryRequest,
                discovery_pb2.DiscoveryResponse,
                metadata=call_metadata(self._settings),
            )
        )
        await self._call.send_request()
        self._sender = asyncio.create_task(self._send_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        if self._call is not None:
            with contextlib.suppress(Exception):
                await self._call.cancel()
            self._call = None
        with contextlib.suppress(Exception):
            await self._stack.aclose()

    async def _send_loop(self) -> None:
        while True:
            await self._call.send_message(await self._out.get())

    def send(self, type_url: str, *, error: str | None = None, nonce: str = "", version: str = "") -> None:
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce, version_info=version)
        if self._first:
            req.node.CopyFrom(node_of(self._cfg))
            self._first = False
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
        self._out.put_nowait(req)

    async def recv(self, timeout: float = 30) -> discovery_pb2.DiscoveryResponse:
        assert self._call is not None
        try:
            msg = await asyncio.wait_for(self._call.recv_message(), timeout)
        except GRPCError as exc:
            raise ConnectionError(f"istiod closed the ADS stream: {exc.status.name} {exc.message}") from exc
        if msg is None:
            raise ConnectionError("istiod closed the ADS stream")
        assert isinstance(msg, discovery_pb2.DiscoveryResponse)
        return msg
