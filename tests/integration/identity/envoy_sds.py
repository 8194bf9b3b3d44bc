"""A real Envoy that takes its mTLS certificates from our SDS socket, and a TLS client to poke it."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from tests.helpers.envoy import find_envoy_binary, uds_grpc_cluster
from tests.helpers.net import free_port

GREETING = "hello from envoy"


def _sds(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
                "set_node_on_first_message_only": True,
            },
            "resource_api_version": "V3",
            "initial_fetch_timeout": "0s",
        },
    }


def bootstrap(sds_socket: Path, admin_port: int, listener_port: int) -> dict[str, Any]:
    return {
        "node": {"id": "sidecar~127.0.0.1~vm.ns1~ns1.svc.cluster.local", "cluster": "vm.ns1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "clusters": [uds_grpc_cluster("sds-grpc", sds_socket)],
            "listeners": [
                {
                    "name": "inbound-mtls",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                                    "require_client_certificate": True,
                                    "common_tls_context": {
                                        "tls_certificate_sds_secret_configs": [_sds("default")],
                                        "validation_context_sds_secret_config": _sds("ROOTCA"),
                                    },
                                },
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "inbound",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {"inline_string": GREETING},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ],
                        }
                    ],
                }
            ],
        },
    }


@dataclass
class RunningEnvoy:
    process: asyncio.subprocess.Process
    admin_port: int
    listener_port: int
    log_path: Path

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as resp:
            return str(resp.read().decode())

    def certs(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.admin("/certs"))
        return doc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def envoy_with_sds(sds_socket: Path, workdir: Path) -> AsyncIterator[RunningEnvoy]:
    admin_port, listener_port = free_port(), free_port()
    config = workdir / "envoy.json"
    config.write_text(json.dumps(bootstrap(sds_socket, admin_port, listener_port)))
    log_path = workdir / "envoy.log"
    proc = await asyncio.create_subprocess_exec(
        str(find_envoy_binary()),
        "-c",
        str(config),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "--log-level",
        "info",
        "--log-path",
        str(log_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    envoy = RunningEnvoy(proc, admin_port, listener_port, log_path)
    try:
        yield envoy
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@dataclass
class HandshakeResult:
    ok: bool
    data: str
    server_cert: x509.Certificate | None
    error: str | None


def mtls_call(port: int, root_pem: bytes, client: tuple[bytes, bytes] | None) -> HandshakeResult:
    """Connect with TLS, verifying Envoy against ``root_pem``, optionally presenting ``client`` (key, chain)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # workload certificates carry a SPIFFE URI, no DNS name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=root_pem.decode())
    with tempfile.TemporaryDirectory() as tmp:
        if client is not None:
            key_path, chain_path = Path(tmp) / "k.pem", Path(tmp) / "c.pem"
            key_path.write_bytes(client[0])
            chain_path.write_bytes(client[1])
            ctx.load_cert_chain(chain_path, key_path)
        server_cert: x509.Certificate | None = None
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                ctx.wrap_socket(raw) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                server_cert = x509.load_der_x509_certificate(der) if der else None
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                chunks = []
                while True:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    chunks.append(chunk)
                data = b"".join(chunks).decode()
        except (OSError, ssl.SSLError) as exc:
            return HandshakeResult(False, "", server_cert, f"{type(exc).__name__}: {exc}")
    return HandshakeResult(data.startswith("HTTP/1.1 200") and data.endswith(GREETING), data, server_cert, None)


def spiffe_uris(cert: x509.Certificate) -> list[str]:
    """The SPIFFE URIs in a peer's certificate, read with the cryptography library (independent of the agent)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
