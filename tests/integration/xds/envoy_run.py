"""A real Envoy whose only xDS source is the proxy's Unix socket (static bootstrap, like Istio's xds-grpc)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.envoy import H2_PROTOCOL_OPTIONS, find_envoy_binary, uds_grpc_cluster
from tests.helpers.net import free_port

NODE_ID = "sidecar~127.0.0.1~vm.vm-ns~vm-ns.svc.cluster.local"


@dataclass(frozen=True)
class DirectXds:
    """Dial the ADS server straight over TLS instead of the proxy's socket (the benchmark's baseline)."""

    host: str
    port: int
    root_cert: Path
    server_name: str


def _xds_cluster(socket_path: Path | None, direct: DirectXds | None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": "xds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": H2_PROTOCOL_OPTIONS,
    }
    if direct is None:
        address: dict[str, Any] = {"pipe": {"path": str(socket_path)}}
    else:
        address = {"socket_address": {"address": direct.host, "port_value": direct.port}}
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": direct.server_name,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "validation_context": {
                        "trusted_ca": {"filename": str(direct.root_cert)},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": direct.server_name}}
                        ],
                    },
                },
            },
        }
    cluster["load_assignment"] = {
        "cluster_name": "xds-grpc",
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
    }
    return cluster


def _uds_cluster(name: str, path: Path) -> dict[str, Any]:
    return uds_grpc_cluster(name, path)


def bootstrap(
    socket_path: Path | None,
    admin_port: int,
    api_type: str,
    direct: DirectXds | None = None,
    stats: bool = True,
    node: dict[str, Any] | None = None,
    sds_socket: Path | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node": {"id": NODE_ID, "cluster": "vm.vm-ns"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": "xds-grpc",
                            # Fast reconnects keep the restart tests short.
                            "retry_policy": {"retry_back_off": {"base_interval": "0.1s", "max_interval": "0.5s"}},
                        }
                    }
                ],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [_xds_cluster(socket_path, direct)]},
    }
    if node is not None:
        doc["node"] = node
    if sds_socket is not None:
        doc["static_resources"]["clusters"].append(_uds_cluster("sds-grpc", sds_socket))
    if not stats:
        doc["stats_config"] = {"stats_matcher": {"reject_all": True}}
    return doc


class RunningEnvoy:
    def __init__(self, admin_port: int, log_path: Path) -> None:
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.log_path = log_path

    async def get(self, path: str) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.admin + path) as resp:
            return await resp.text()

    async def config_dump(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(await self.get("/config_dump"))
        return doc

    async def names(self) -> tuple[set[str], set[str]]:
        """Names of dynamic active clusters and listeners."""
        clusters: set[str] = set()
        listeners: set[str] = set()
        for section in (await self.config_dump())["configs"]:
            for c in section.get("dynamic_active_clusters", []):
                clusters.add(c["cluster"]["name"])
            for lis in section.get("dynamic_listeners", []):
                if "active_state" in lis:
                    listeners.add(lis["name"])
        return clusters, listeners

    async def wait_names(self, clusters: set[str], listeners: set[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        seen: tuple[set[str], set[str]] = (set(), set())
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                seen = await self.names()
                if seen == (clusters, listeners):
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"Envoy has clusters/listeners {seen}, expected {(clusters, listeners)}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def running_envoy(
    tmp_path: Path,
    socket_path: Path | None,
    api_type: str,
    *,
    direct: DirectXds | None = None,
    debug_config: bool = True,
    stats: bool = True,
    name: str = "envoy",
    node: dict[str, Any] | None = None,
    sds_socket: Path | None = None,
) -> AsyncIterator[RunningEnvoy]:
    admin_port = free_port()
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(bootstrap(socket_path, admin_port, api_type, direct, stats, node, sds_socket)))
    log_path = tmp_path / f"{name}.log"
    log_file = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(find_envoy_binary()),
        "--config-path",
        str(config),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "--log-level",
        "warning",
        # config:debug logs the type URL of every response Envoy receives; tests read it to prove what
        # reached Envoy and what did not.
        *(["--component-log-level", "config:debug"] if debug_config else []),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        # stderr, unlike --log-path, is written line by line, so the log is current when a test reads it.
        stderr=log_file,
    )
    log_file.close()
    envoy = RunningEnvoy(admin_port, log_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"Envoy exited with {proc.returncode}:\n{envoy.log()[-3000:]}")
            try:
                await envoy.get("/server_info")
                break
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        yield envoy
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
