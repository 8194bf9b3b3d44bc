"""Real Envoy around generated resources: bootstraps, a throwaway mesh CA, a tiny SDS server."""

from __future__ import annotations

import contextlib
import datetime
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2, json_format

from tests.helpers.envoy import find_envoy_binary, uds_grpc_cluster
from tests.helpers.net import free_port
from vm_agent.mesh.xdsgen import CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL
from vm_agent.telemetry import NodeExchange, Workload, for_stock_envoy, header_value
from vm_agent.telemetry.native import NativeStats

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def through_agent(
    resources: Mapping[str, Mapping[str, any_pb2.Any]],
    node_id: str,
    *,
    telemetry: bool = True,
    workload: Workload | None = None,
    native: NativeStats | None = None,
) -> dict[str, dict[str, any_pb2.Any]]:
    """What Envoy receives through the agent: the local mesh pushes istiod's telemetry filters, and the agent's
    xDS proxy rewrites them for stock Envoy (vm_agent.telemetry.rewrite). ``telemetry=False`` only drops them.
    ``workload``: what the exchange header says about this proxy (a minimal one by default); ``native``: the native
    stats filter, as the agent uses it with the shipped Envoy."""
    if workload is None:
        workload = Workload(namespace="vm-ns", workload=[*node_id.split("~"), "", "", ""][2])
    exchange = NodeExchange(node_id, header_value(workload)) if telemetry else None
    out = {t: dict(r) for t, r in resources.items()}
    for type_url in (CLUSTER_TYPE_URL, LISTENER_TYPE_URL):
        resp = discovery_pb2.DiscoveryResponse(type_url=type_url)
        names = list(out[type_url])
        resp.resources.extend(out[type_url][n] for n in names)
        raw, _ = for_stock_envoy(resp.SerializeToString(), type_url, delta=False, node=exchange, native=native)
        out[type_url] = dict(zip(names, discovery_pb2.DiscoveryResponse.FromString(raw).resources, strict=True))
    return out


def _dicts(resources: Mapping[str, any_pb2.Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, packed in resources.items():
        d = json_format.MessageToDict(packed, preserving_proto_field_name=True)
        d.pop("@type")
        out[name] = d
    return out


def bootstrap(
    resources: Mapping[str, Mapping[str, any_pb2.Any]],
    *,
    node_id: str,
    sds_socket: Path,
    admin_port: int,
    inline: bool,
    telemetry: bool = True,
    workload: Workload | None = None,
    native: NativeStats | None = None,
) -> dict[str, Any]:
    """A bootstrap carrying the generated resources as static_resources.

    ``inline=False`` keeps them exactly as generated (EDS and RDS over ADS, which validation accepts
    without a server). ``inline=True`` folds the generated ClusterLoadAssignments and RouteConfigurations
    into their clusters and listeners so that Envoy can pass traffic without an ADS server.
    """
    resources = through_agent(resources, node_id, telemetry=telemetry, workload=workload, native=native)
    clusters = _dicts(resources[CLUSTER_TYPE_URL])
    listeners = _dicts(resources[LISTENER_TYPE_URL])
    if inline:
        cla = _dicts(resources[ENDPOINT_TYPE_URL])
        routes = _dicts(resources[ROUTE_TYPE_URL])
        for name, c in clusters.items():
            if c.get("type") == "EDS":
                c["type"] = "STATIC"
                del c["eds_cluster_config"]
                c["load_assignment"] = cla[name]
        for lis in listeners.values():
            for chain in lis.get("filter_chains", []):
                for f in chain.get("filters", []):
                    tc = f["typed_config"]
                    if "rds" in tc:
                        tc["route_config"] = routes[tc.pop("rds")["route_config_name"]]
    static_clusters = [
        *clusters.values(),
        uds_grpc_cluster("sds-grpc", sds_socket),
    ]
    boot: dict[str, Any] = {
        "node": {"id": node_id, "cluster": "vm-app.vm-ns"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": list(listeners.values()), "clusters": static_clusters},
    }
    if not inline:
        static_clusters.append(
            {
                "name": "xds-grpc",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": static_clusters[-1]["typed_extension_protocol_options"],
                "load_assignment": {
                    "cluster_name": "xds-grpc",
                    "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(sds_socket) + ".xds"}}}}]}
                    ],
                },
            }
        )
        boot["dynamic_resources"] = {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            }
        }
    return boot


def envoy_validate(boot: dict[str, Any], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(boot))
    return subprocess.run(
        [str(find_envoy_binary()), "--mode", "validate", "-c", str(path), "-l", "warning", "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --------------------------------------------------------------------------------------------------
# A throwaway mesh CA


@dataclass(frozen=True)
class Svid:
    key_pem: bytes
    chain_pem: bytes


class MeshCa:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vm-agent test mesh")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.root_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, spiffe_id: str) -> Svid:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Svid(key_pem, cert.public_bytes(serialization.Encoding.PEM) + self.root_pem)


# --------------------------------------------------------------------------------------------------
# SDS: `default` and `ROOTCA`, as the agent serves them


class _Sds(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, svid: Svid, root_pem: bytes) -> None:
        self.secrets = {
            "default": secret_pb2.Secret(
                name="default",
                tls_certificate={
                    "certificate_chain": {"inline_bytes": svid.chain_pem},
                    "private_key": {"inline_bytes": svid.key_pem},
                },
            ),
            "ROOTCA": secret_pb2.Secret(name="ROOTCA", validation_context={"trusted_ca": {"inline_bytes": root_pem}}),
        }
        self.served: set[str] = set()

    def StreamSecrets(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        sent: set[str] = set()
        for req in request_iterator:
            wanted = [n for n in req.resource_names if n not in sent]
            if not wanted:
                continue  # an ACK
            sent.update(wanted)
            self.served.update(wanted)
            resp = discovery_pb2.DiscoveryResponse(type_url=SECRET_TYPE_URL, version_info="1", nonce=uuid.uuid4().hex)
            for n in wanted:
                resp.resources.add().Pack(self.secrets[n])
            yield resp


@contextlib.contextmanager
def sds_server(socket_path: Path, svid: Svid, root_pem: bytes) -> Iterator[_Sds]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = _Sds(svid, root_pem)
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    try:
        yield servicer
    finally:
        server.stop(grace=None).wait(5)


@contextlib.contextmanager
def running_envoy(
    boot: dict[str, Any],
    workdir: Path,
    *,
    prefix: Sequence[str] = (),
    ready_within: float = 30,
    concurrency: int = 1,
) -> Iterator[int]:
    """Run Envoy with ``boot``; yields its admin port once every listener is active. ``prefix``: a command Envoy
    runs under (a profiler), which may need a longer ``ready_within``; ``concurrency``: its worker threads."""
    admin_port = boot["admin"]["address"]["socket_address"]["port_value"]
    path = workdir / "envoy.json"
    path.write_text(json.dumps(boot))
    log = (workdir / "envoy.log").open("w")
    proc = subprocess.Popen(
        [
            *prefix,
            str(find_envoy_binary()),
            "-c",
            str(path),
            "--disable-hot-restart",
            "--concurrency",
            str(concurrency),
            "-l",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + ready_within
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"envoy exited {proc.returncode}: {(workdir / 'envoy.log').read_text()[-3000:]}")
            if _admin(admin_port, "/ready") == "LIVE" and "listener_manager.total_listeners_warming: 0" in _admin(
                admin_port, "/stats?filter=listener_manager.total_listeners_warming"
            ):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy not ready: {(workdir / 'envoy.log').read_text()[-3000:]}")
            time.sleep(0.1)
        yield admin_port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _admin(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return str(r.read().decode().strip())
    except OSError:
        return ""


__all__ = ["MeshCa", "Svid", "bootstrap", "envoy_validate", "free_port", "running_envoy", "sds_server"]
