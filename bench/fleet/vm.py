"""One simulated VM: the agent's own config loader, identity, xDS proxy and health checker, without Envoy.

Each VM loads istioctl's files with its own address and pod name (so its own node id and WorkloadEntry),
gets an ECDSA certificate from istiod's CA through ``SecretManager``, runs the real ``health.Checker`` on
a scripted app, and drives ``xds.Proxy.serve_stream`` with a ``Downstream`` that plays Envoy's part:

* ``nds``: the stream opens with a NameTable subscription carrying the node, then stays quiet. The proxy
  consumes and ACKs the NameTable and carries the health reports, exactly as in the agent.
* ``ads``: CDS and LDS (wildcard) and EDS for the fleet's own Service, every response ACKed by nonce
  without being decoded; the proxy adds the NameTable subscription after LDS as it does for Envoy.

When a stream ends the downstream opens a new one after ~0.5 s, like Envoy; the proxy's pacer decides
when the upstream is actually dialed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from grpclib.const import Status

from vm_agent.agent import health_settings, identity_settings, upstream_settings
from vm_agent.config import Config, Options, load
from vm_agent.health import Checker
from vm_agent.identity.manager import SecretManager
from vm_agent.proto import NAME_TABLE_TYPE_URL, nds_pb2
from vm_agent.xds import Proxy, ReportPolicy, XdsSettings
from vm_agent.xds.eds_witness import ENDPOINT_TYPE_URL
from vm_agent.xds.wire import Flavour, build_request, peek_response

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"


def vm_address(index: int) -> str:
    """Addresses nothing ever dials: istiod only stores them in WorkloadEntries and EDS."""
    return f"10.200.{index // 250}.{index % 250 + 1}"


def node_of(cfg: Config) -> base_pb2.Node:
    """The node Envoy would send: id, cluster and the metadata the agent renders into its bootstrap."""
    md = struct_pb2.Struct()
    md.update(dict(cfg.node.metadata))
    node = base_pb2.Node(id=cfg.node.id, cluster=cfg.node.cluster, metadata=md)
    locality = cfg.node.locality or {}
    node.locality.region = locality.get("region", "")
    node.locality.zone = locality.get("zone", "")
    node.locality.sub_zone = locality.get("sub_zone", "")
    return node


@dataclass
class FlipWatch:
    """Records when each VM's EDS first shows one address present (or absent), as bytes."""

    needle: bytes = b""
    present: bool = True
    since: float = 0.0
    seen: dict[int, float] = field(default_factory=dict)

    def arm(self, needle: bytes, present: bool) -> None:
        self.needle, self.present, self.since = needle, present, time.monotonic()
        self.seen = {}

    def look(self, vm: int, message: bytes) -> None:
        if self.needle and vm not in self.seen and (self.needle in message) == self.present:
            self.seen[vm] = time.monotonic()


class NdsDownstream:
    """NDS + health only: one NameTable subscription carrying the node, then silence."""

    def __init__(self, node: base_pb2.Node) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE_URL)
        req.node.CopyFrom(node)
        self._first: bytes | None = req.SerializeToString()
        self.code: Status | None = None

    async def read(self) -> bytes | None:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        await asyncio.Event().wait()  # Envoy is absent: the stream ends from the proxy's side only
        return None

    def cancelled(self) -> bool:
        return False

    async def write(self, message: bytes) -> None:
        return None

    def end(self, code: Status, details: str) -> None:
        self.code = code


class AdsDownstream:
    """Full ADS: CDS, LDS, EDS of the fleet's Service; every response ACKed by nonce, never decoded."""

    def __init__(self, node: base_pb2.Node, eds_cluster: str, on_eds: Callable[[bytes], None]) -> None:
        first = discovery_pb2.DeltaDiscoveryRequest(type_url=CDS)
        first.node.CopyFrom(node)
        self._out: asyncio.Queue[bytes] = asyncio.Queue()
        self._out.put_nowait(first.SerializeToString())
        self._out.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=LDS).SerializeToString())
        eds = discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT_TYPE_URL, resource_names_subscribe=[eds_cluster])
        self._out.put_nowait(eds.SerializeToString())
        self._on_eds = on_eds
        self.code: Status | None = None

    async def read(self) -> bytes | None:
        return await self._out.get()

    def cancelled(self) -> bool:
        return False

    async def write(self, message: bytes) -> None:
        head = peek_response(message)
        if head.type_url == ENDPOINT_TYPE_URL:
            self._on_eds(message)
        self._out.put_nowait(build_request(Flavour.DELTA, head.type_url, response_nonce=head.nonce))

    def end(self, code: Status, details: str) -> None:
        self.code = code


@dataclass(frozen=True)
class FleetSettings:
    files: Path
    """istioctl's VM files, shared by every VM."""
    work: Path
    mode: str
    """``nds`` or ``ads``."""
    policy: ReportPolicy
    eds_cluster: str


class SimVm:
    def __init__(self, index: int, fleet: FleetSettings, flip: FlipWatch) -> None:
        self.index = index
        self.address = vm_address(index)
        self.fleet = fleet
        self.flip = flip
        state = fleet.work / f"vm{index}"
        resolv = fleet.work / "resolv.conf"
        self.config = load(
            Options(
                config_dir=fleet.files,
                state_dir=state,
                resolv_conf=resolv,
                scan_interfaces=False,
                extra_env={
                    "ISTIO_SVC_IP": self.address,
                    "POD_NAME": f"fleet-vm-{index}",
                    "ECC_SIGNATURE_ALGORITHM": "ECDSA",
                },
            )
        )
        if self.config.problems:
            raise RuntimeError(f"VM {index}: {'; '.join(str(p) for p in self.config.problems)}")
        self.secrets = SecretManager(identity_settings(self.config))
        self.proxy = Proxy(
            XdsSettings(
                socket_path=state / "XDS",  # never bound: the simulated Envoy calls serve_stream directly
                upstream=upstream_settings(self.config, for_ca=False),
                dns_enabled=True,
                health=fleet.policy,
                instance_ip=self.address,
            ),  # no rewrite_response: nothing decodes LDS/CDS here
            client_cert=self.secrets.client_cert,
            on_name_table=self._on_name_table,
        )
        hs = health_settings(self.config)
        if hs is None:
            raise RuntimeError("the WorkloadGroup has no probe: istioctl wrote no readinessProbe into mesh.yaml")
        self.app_healthy = True
        self.checker = Checker(hs, envoy_ready=_envoy_ready, on_event=self.proxy.report_health, prober=self._probe)
        self.node = node_of(self.config)
        self.tables = 0
        self.table_names = 0
        self.started_at: float | None = None
        self.certified_at: float | None = None

    @property
    def entry_name(self) -> str:
        return f"{self.config.agent.auto_register_group}-{self.address}"

    async def _probe(self) -> tuple[bool, str]:
        return (True, "") if self.app_healthy else (False, "HTTP probe failed with statuscode: 503")

    async def _on_name_table(self, table: nds_pb2.NameTable) -> None:
        self.tables += 1
        self.table_names = len(table.table)

    def _on_eds(self, message: bytes) -> None:
        self.flip.look(self.index, message)

    async def run(self, ca_slot: Callable[[], Awaitable[None]]) -> None:
        """Certificate first (at the fleet's CA rate), then probes and the xDS stream, until cancelled."""
        await ca_slot()
        self.started_at = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.secrets.run())
            await self.secrets.ready.wait()
            self.certified_at = time.monotonic()
            tg.create_task(self.checker.run())
            tg.create_task(self._envoy())

    async def _envoy(self) -> None:
        while True:
            downstream: Any
            if self.fleet.mode == "ads":
                downstream = AdsDownstream(self.node, self.fleet.eds_cluster, self._on_eds)
            else:
                downstream = NdsDownstream(self.node)
            with contextlib.suppress(Exception):
                await self.proxy.serve_stream(Flavour.DELTA, downstream)
            # Envoy's own retry interval before it opens the next stream to the agent.
            await asyncio.sleep(random.uniform(0.25, 0.75))

    def snapshot(self) -> dict[str, Any]:
        return self.proxy.snapshot()


async def _envoy_ready() -> str | None:
    return None
