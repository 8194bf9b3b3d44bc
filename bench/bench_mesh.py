"""The local mesh: how fast a change reaches connected proxies, and how fast the CA signs.

* Push latency: N plain grpcio ADS clients (SotW, CDS + NameTable) stay connected; a ServiceEntry is
  added either by writing a file into the manifests folder (polled every 0.2 s, the default) or through
  the admin API. Latency = from the change until the *last* client has the new NameTable.
* CA: CreateCertificate calls per second with a bearer token (RSA-free: EC P-256 CSRs), one client.

``python -m bench bench_mesh`` or ``python -m bench.bench_mesh [--proxies 1,10,50] [--rounds 5]``.
Writes bench/results/mesh.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from vm_agent.mesh import MeshServer, MeshSettings
from vm_agent.mesh.ads import SOTW_PATH
from vm_agent.proto import CA_CREATE_CERTIFICATE_PATH, NAME_TABLE_TYPE_URL, ca_pb2, nds_pb2

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "mesh.md"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: vm-ns}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: vm-sa, namespace: vm-ns}
---
apiVersion: v1
kind: Service
metadata: {name: vm-app, namespace: vm-ns}
spec:
  selector: {app: vm-app}
  ports: [{name: http, port: 8080}]
"""


def _entry(i: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bench-{i}, namespace: vm-ns}}
spec:
  hosts: [bench-{i}.example.internal]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 443, name: tls, protocol: TLS}}]
"""


def _node(i: int) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    ip = f"127.0.{1 + i // 250}.{2 + i % 250}"
    meta.update(
        {
            "NAMESPACE": "vm-ns",
            "SERVICE_ACCOUNT": "vm-sa",
            "INSTANCE_IPS": ip,
            "DNS_CAPTURE": "true",
            "INTERCEPTION_MODE": "NONE",
            "CLUSTER_ID": "Kubernetes",
        }
    )
    return base_pb2.Node(id=f"sidecar~{ip}~bench{i}.vm-ns~vm-ns.svc.cluster.local", metadata=meta)


class _Proxy:
    def __init__(self, call: Any) -> None:
        self.call = call
        self.hosts: set[str] = set()
        self.changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                return
            await self.call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=msg.type_url, version_info=msg.version_info, response_nonce=msg.nonce
                )
            )
            if msg.type_url == NAME_TABLE_TYPE_URL and msg.resources:
                table = nds_pb2.NameTable()
                msg.resources[0].Unpack(table)
                self.hosts = set(table.table)
                self.changed.set()


@contextlib.asynccontextmanager
async def _proxies(mesh: MeshServer, n: int) -> AsyncIterator[list[_Proxy]]:
    token = mesh.mint_token("vm-ns", "vm-sa")
    creds = grpc.ssl_channel_credentials(mesh.root_cert_pem)
    channels = [
        grpc.aio.secure_channel(
            mesh.xds_address, creds, options=[("grpc.ssl_target_name_override", "istiod.istio-system.svc")]
        )
        for _ in range(n)
    ]
    proxies: list[_Proxy] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i, ch in enumerate(channels):
            stub = ch.stream_stream(
                SOTW_PATH,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
            call = stub(metadata=[("authorization", f"Bearer {token}")])
            await call.write(discovery_pb2.DiscoveryRequest(type_url=CDS, node=_node(i)))
            await call.write(discovery_pb2.DiscoveryRequest(type_url=NAME_TABLE_TYPE_URL))
            p = _Proxy(call)
            proxies.append(p)
            tasks.append(asyncio.create_task(p.run()))
        for p in proxies:
            await asyncio.wait_for(p.changed.wait(), 30)
        yield proxies
    finally:
        for t in tasks:
            t.cancel()
        for ch in channels:
            await ch.close()


async def _until_all_have(proxies: list[_Proxy], host: str) -> float:
    while not all(host in p.hosts for p in proxies):
        await asyncio.gather(*(p.changed.wait() for p in proxies if host not in p.hosts))
        for p in proxies:
            p.changed.clear()
    return time.perf_counter()


async def _push_latency(n: int, rounds: int, via: str) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "manifests"
        folder.mkdir()
        (folder / "base.yaml").write_text(BASE)
        settings = MeshSettings(
            state_dir=Path(d) / "state", manifests_dir=folder, listen="127.0.0.1:0", admin_listen="127.0.0.1:0"
        )
        mesh = MeshServer(settings)
        task = asyncio.create_task(mesh.run())
        await asyncio.wait_for(mesh.ready.wait(), 30)
        out: list[float] = []
        try:
            async with _proxies(mesh, n) as proxies, aiohttp.ClientSession() as http:
                for r in range(rounds):
                    for p in proxies:
                        p.changed.clear()
                    text = _entry(r)
                    started = time.perf_counter()
                    if via == "file":
                        (folder / f"entry-{r}.yaml").write_text(text)
                    else:
                        async with http.post(f"{mesh.admin_url}/v1/apply", data=text) as resp:
                            resp.raise_for_status()
                    done = await asyncio.wait_for(_until_all_have(proxies, f"bench-{r}.example.internal"), 30)
                    out.append((done - started) * 1000)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return out


async def _ca_rate(calls: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        mesh = MeshServer(MeshSettings(state_dir=Path(d), listen="127.0.0.1:0", admin_listen="127.0.0.1:0"))
        mesh.apply_yaml(BASE)
        task = asyncio.create_task(mesh.run())
        await asyncio.wait_for(mesh.ready.wait(), 30)
        try:
            token = mesh.mint_token("vm-ns", "vm-sa")
            csrs = []
            for _ in range(calls):
                key = ec.generate_private_key(ec.SECP256R1())
                csrs.append(
                    x509.CertificateSigningRequestBuilder()
                    .subject_name(x509.Name([]))
                    .sign(key, hashes.SHA256())
                    .public_bytes(serialization.Encoding.PEM)
                    .decode()
                )
            creds = grpc.ssl_channel_credentials(mesh.root_cert_pem)
            async with grpc.aio.secure_channel(
                mesh.xds_address, creds, options=[("grpc.ssl_target_name_override", "istiod.istio-system.svc")]
            ) as ch:
                call = ch.unary_unary(
                    CA_CREATE_CERTIFICATE_PATH,
                    request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
                    response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
                )
                md = [("authorization", f"Bearer {token}")]
                lat: list[float] = []
                started = time.perf_counter()
                for csr in csrs:
                    t0 = time.perf_counter()
                    await call(ca_pb2.IstioCertificateRequest(csr=csr), metadata=md, timeout=10)
                    lat.append((time.perf_counter() - t0) * 1000)
                elapsed = time.perf_counter() - started
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return calls / elapsed, statistics.median(lat)


def _row(label: str, values: list[float]) -> str:
    values = sorted(values)
    p50 = statistics.median(values)
    return f"| {label} | {len(values)} | {p50:.1f} | {values[-1]:.1f} |"


async def _run(proxy_counts: list[int], rounds: int) -> str:
    lines = [
        "# Local mesh",
        "",
        f"Machine: shared 2-core VM; Python {sys.version.split()[0]}. One run; rounds per row: {rounds}.",
        "",
        "## Change → new NameTable at every connected proxy (ms)",
        "",
        "| change via, proxies | rounds | p50 | max |",
        "|---|---|---|---|",
    ]
    for n in proxy_counts:
        for via in ("admin API", "file"):
            values = await _push_latency(n, rounds, "file" if via == "file" else "api")
            lines.append(_row(f"{via}, {n}", values))
            print(lines[-1], flush=True)
    rate, p50 = await _ca_rate(50)
    lines += [
        "",
        "The file path includes the folder poll interval (0.2 s by default).",
        "",
        "## CA",
        "",
        "| CreateCertificate, one client, sequential | value |",
        "|---|---|",
        f"| certificates / s | {rate:.0f} |",
        f"| p50 latency (ms) | {p50:.1f} |",
        "",
    ]
    print(lines[-3], flush=True)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proxies", default="1,10,50")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" else [])
    text = asyncio.run(_run([int(x) for x in args.proxies.split(",")], args.rounds))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
