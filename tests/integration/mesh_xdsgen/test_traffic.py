"""Two Envoys configured by xdsgen (NONE interception, instance IPs 127.0.0.2 and 127.0.0.3) carry HTTP
between two local apps over mutual TLS, with certificates served over SDS like the agent does."""

from __future__ import annotations

import contextlib
import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.apps import echo_app, get_json, serving
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
    with serving(echo_app("a")) as pa, serving(echo_app("b")) as pb:
        sa, sb = free_port(), free_port()
        objs = parse_documents(MESH.format(pa=pa, pb=pb, sa=sa, sb=sb), "mesh.yaml")
        snap = MeshSnapshot(1, {key(o): o for o in objs})
        with _sidecar(tmp_path, snap, ca, "127.0.0.2", "sa-a"), _sidecar(tmp_path, snap, ca, "127.0.0.3", "sa-b"):
            # A's app calls svc-b through A's loopback listener; B's app sees A's SPIFFE identity.
            status, body = get_json(sb, "/from-a")
            assert status == 200, body
            assert body["app"] == "b"
            assert body["path"] == "/from-a"
            xfcc = body["headers"]["x-forwarded-client-cert"]
            assert f"URI=spiffe://{TD}/ns/vm-ns/sa/sa-a" in xfcc
            assert f"By=spiffe://{TD}/ns/vm-ns/sa/sa-b" in xfcc
            # Routed by Host too (short name within the namespace).
            status, body = get_json(sb, "/by-name", host="svc-b")
            assert (status, body["app"]) == (200, "b")
            # And the other way round.
            status, body = get_json(sa, "/from-b")
            assert (status, body["app"]) == (200, "a")
            assert f"URI=spiffe://{TD}/ns/vm-ns/sa/sa-b" in body["headers"]["x-forwarded-client-cert"]
            # B's inbound listener refuses plaintext: only mesh peers with a certificate get in.
            with pytest.raises((http.client.HTTPException, OSError)):
                get_json(pb, "/plain", ip="127.0.0.3")


def test_wrong_server_identity_is_refused(tmp_path: Path) -> None:
    """A's cluster for svc-b pins B's SPIFFE id: a B with a valid mesh certificate for another account fails."""
    ca = MeshCa()
    with serving(echo_app("a")) as pa, serving(echo_app("b")) as pb:
        sa, sb = free_port(), free_port()
        objs = parse_documents(MESH.format(pa=pa, pb=pb, sa=sa, sb=sb), "mesh.yaml")
        snap = MeshSnapshot(1, {key(o): o for o in objs})
        with (
            _sidecar(tmp_path, snap, ca, "127.0.0.2", "sa-a"),
            _sidecar(tmp_path, snap, ca, "127.0.0.3", "sa-b", identity=f"spiffe://{TD}/ns/vm-ns/sa/impostor"),
        ):
            status, _ = get_json(sb, "/from-a")
            assert status == 503
