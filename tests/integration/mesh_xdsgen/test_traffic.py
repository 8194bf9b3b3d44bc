"""Two Envoys configured by xdsgen (NONE interception, instance IPs 127.0.0.2 and 127.0.0.3) carry HTTP
between two local apps over mutual TLS, with certificates served over SDS like the agent does."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh_xdsgen.support import MeshCa, bootstrap, free_port, running_envoy, sds_server
from vm_agent.mesh.model import MeshSnapshot, key, parse_documents
from vm_agent.mesh.xdsgen import ProxyView, generate

pytestmark = pytest.mark.integration

TD = "example.org"

MESH = """
apiVersion: v1
kind: Service
metadata: {{name: svc-a, namespace: vm-ns}}
spec: {{clusterIP: 10.96.1.1, selector: {{app: a}}, ports: [{{name: http, port: {sa}, targetPort: {pa}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: svc-b, namespace: vm-ns}}
spec: {{clusterIP: 10.96.1.2, selector: {{app: b}}, ports: [{{name: http, port: {sb}, targetPort: {pb}}}]}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: a-127.0.0.2, namespace: vm-ns}}
spec: {{address: 127.0.0.2, labels: {{app: a}}, serviceAccount: sa-a, ports: {{http: {pa}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: b-127.0.0.3, namespace: vm-ns}}
spec: {{address: 127.0.0.3, labels: {{app: b}}, serviceAccount: sa-b, ports: {{http: {pb}}}}}
"""


def _app(name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"app": name, "path": self.path, "headers": dict(self.headers.items())}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@contextlib.contextmanager
def _serving(server: ThreadingHTTPServer) -> Iterator[int]:
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def _get(port: int, path: str, host: str | None = None, ip: str = "127.0.0.1") -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(ip, port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if resp.getheader("content-type") == "application/json" else {})
    finally:
        conn.close()


def _proxy(ip: str, sa: str) -> ProxyView:
    return ProxyView(
        node_id=f"sidecar~{ip}~{sa}.vm-ns~vm-ns.svc.cluster.local",
        ips=(ip,),
        namespace="vm-ns",
        service_account=sa,
        interception_mode="NONE",
    )


@contextlib.contextmanager
def _sidecar(
    tmp: Path, snap: MeshSnapshot, ca: MeshCa, ip: str, sa: str, *, identity: str | None = None
) -> Iterator[None]:
    work = tmp / ip
    work.mkdir(exist_ok=True)
    proxy = _proxy(ip, sa)
    res = generate(snap, proxy, trust_domain=TD, vips={})
    sock = work / "sds.sock"
    svid = ca.issue(identity or f"spiffe://{TD}/ns/vm-ns/sa/{sa}")
    with sds_server(sock, svid, ca.root_pem) as sds:
        boot = bootstrap(res, node_id=proxy.node_id, sds_socket=sock, admin_port=free_port(), inline=True)
        with running_envoy(boot, work):
            assert {"default", "ROOTCA"} <= sds.served
            yield


def test_http_over_mtls_between_two_vms(tmp_path: Path) -> None:
    ca = MeshCa()
    with _serving(_app("a")) as pa, _serving(_app("b")) as pb:
        sa, sb = free_port(), free_port()
        objs = parse_documents(MESH.format(pa=pa, pb=pb, sa=sa, sb=sb), "mesh.yaml")
        snap = MeshSnapshot(1, {key(o): o for o in objs})
        with _sidecar(tmp_path, snap, ca, "127.0.0.2", "sa-a"), _sidecar(tmp_path, snap, ca, "127.0.0.3", "sa-b"):
            # A's app calls svc-b through A's loopback listener; B's app sees A's SPIFFE identity.
            status, body = _get(sb, "/from-a")
            assert status == 200, body
            assert body["app"] == "b"
            assert body["path"] == "/from-a"
            xfcc = body["headers"]["x-forwarded-client-cert"]
            assert f"URI=spiffe://{TD}/ns/vm-ns/sa/sa-a" in xfcc
            assert f"By=spiffe://{TD}/ns/vm-ns/sa/sa-b" in xfcc
            # Routed by Host too (short name within the namespace).
            status, body = _get(sb, "/by-name", host="svc-b")
            assert (status, body["app"]) == (200, "b")
            # And the other way round.
            status, body = _get(sa, "/from-b")
            assert (status, body["app"]) == (200, "a")
            assert f"URI=spiffe://{TD}/ns/vm-ns/sa/sa-b" in body["headers"]["x-forwarded-client-cert"]
            # B's inbound listener refuses plaintext: only mesh peers with a certificate get in.
            with pytest.raises((http.client.HTTPException, OSError)):
                _get(pb, "/plain", ip="127.0.0.3")


def test_wrong_server_identity_is_refused(tmp_path: Path) -> None:
    """A's cluster for svc-b pins B's SPIFFE id: a B with a valid mesh certificate for another account fails."""
    ca = MeshCa()
    with _serving(_app("a")) as pa, _serving(_app("b")) as pb:
        sa, sb = free_port(), free_port()
        objs = parse_documents(MESH.format(pa=pa, pb=pb, sa=sa, sb=sb), "mesh.yaml")
        snap = MeshSnapshot(1, {key(o): o for o in objs})
        with (
            _sidecar(tmp_path, snap, ca, "127.0.0.2", "sa-a"),
            _sidecar(tmp_path, snap, ca, "127.0.0.3", "sa-b", identity=f"spiffe://{TD}/ns/vm-ns/sa/impostor"),
        ):
            status, _ = _get(sb, "/from-a")
            assert status == 503
