"""Real Envoy connected straight to the local mesh: a bootstrap with an ``xds-grpc`` cluster over TLS
(presenting a certificate the mesh issued) and an ``sds-grpc`` cluster served by a tiny SDS server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.helpers.envoy import H2_PROTOCOL_OPTIONS, find_envoy_binary

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_H2 = H2_PROTOCOL_OPTIONS


class _Sds(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """``default`` (the workload key and chain) and ``ROOTCA`` (the mesh root), as the agent serves them."""

    def __init__(self, key_pem: bytes, chain_pem: bytes, root_pem: bytes) -> None:
        self.secrets = {
            "default": secret_pb2.Secret(
                name="default",
                tls_certificate={
                    "certificate_chain": {"inline_bytes": chain_pem},
                    "private_key": {"inline_bytes": key_pem},
                },
            ),
            "ROOTCA": secret_pb2.Secret(name="ROOTCA", validation_context={"trusted_ca": {"inline_bytes": root_pem}}),
        }
        self.served: set[str] = set()

    async def StreamSecrets(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        sent: set[str] = set()
        async for req in request_iterator:
            wanted = [n for n in req.resource_names if n not in sent and n in self.secrets]
            if not wanted:
                continue  # an ACK
            sent.update(wanted)
            self.served.update(wanted)
            resp = discovery_pb2.DiscoveryResponse(type_url=SECRET_TYPE_URL, version_info="1", nonce=uuid.uuid4().hex)
            for n in wanted:
                resp.resources.add().Pack(self.secrets[n])
            yield resp


@contextlib.asynccontextmanager
async def sds_server(socket_path: Path, key_pem: bytes, chain_pem: bytes, root_pem: bytes) -> AsyncIterator[_Sds]:
    server = grpc.aio.server()
    servicer = _Sds(key_pem, chain_pem, root_pem)
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    try:
        yield servicer
    finally:
        await server.stop(grace=None)


def bootstrap(
    *,
    node_id: str,
    metadata: dict[str, Any],
    xds_address: str,
    client_key_pem: bytes,
    client_chain_pem: bytes,
    root_pem: bytes,
    sds_socket: Path,
    admin_port: int,
    delta: bool,
) -> dict[str, Any]:
    host, port = xds_address.rsplit(":", 1)
    return {
        "node": {"id": node_id, "cluster": f"{metadata.get('AUTO_REGISTER_GROUP', 'vm')}.vm-ns", "metadata": metadata},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": _H2,
                    "load_assignment": {
                        "cluster_name": "xds-grpc",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {"socket_address": {"address": host, "port_value": int(port)}}
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                            "sni": "istiod.istio-system.svc",
                            "common_tls_context": {
                                "alpn_protocols": ["h2"],
                                "tls_certificates": [
                                    {
                                        "certificate_chain": {"inline_bytes": _b64(client_chain_pem)},
                                        "private_key": {"inline_bytes": _b64(client_key_pem)},
                                    }
                                ],
                                "validation_context": {
                                    "trusted_ca": {"inline_bytes": _b64(root_pem)},
                                    "match_typed_subject_alt_names": [
                                        {"san_type": "DNS", "matcher": {"exact": "istiod.istio-system.svc"}}
                                    ],
                                },
                            },
                        },
                    },
                },
                {
                    "name": "sds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": _H2,
                    "load_assignment": {
                        "cluster_name": "sds-grpc",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(sds_socket)}}}}]}
                        ],
                    },
                },
            ]
        },
    }


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


async def admin_get(port: int, path: str) -> str:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s,
            s.get(f"http://127.0.0.1:{port}{path}") as r,
        ):
            return (await r.text()).strip()
    except (aiohttp.ClientError, TimeoutError):
        return ""


@contextlib.asynccontextmanager
async def running_envoy(boot: dict[str, Any], workdir: Path) -> AsyncIterator[int]:
    """Envoy with ``boot``; yields its admin port once it is LIVE (initial CDS/LDS applied)."""
    admin_port = int(boot["admin"]["address"]["socket_address"]["port_value"])
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "envoy.json"
    path.write_text(json.dumps(boot))
    log_path = workdir / "envoy.log"
    with log_path.open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            str(find_envoy_binary()),
            "-c",
            str(path),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warning",
            "--base-id",
            str(admin_port),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while await admin_get(admin_port, "/ready") != "LIVE":
                if proc.returncode is not None:
                    raise RuntimeError(f"envoy exited {proc.returncode}: {log_path.read_text()[-3000:]}")
                if loop.time() > deadline:
                    raise TimeoutError(f"envoy not LIVE: {log_path.read_text()[-3000:]}")
                await asyncio.sleep(0.1)
            yield admin_port
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(10):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
