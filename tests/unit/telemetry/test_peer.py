"""The ``x-envoy-peer-metadata`` value: what the VM sends (golden bytes) and what it reads (Istio's test data)."""

from __future__ import annotations

import base64
from pathlib import Path

from vm_agent.telemetry.metrics import LocalWorkload, Raw, istio_labels
from vm_agent.telemetry.peer import decode_header, from_endpoint, header_value, spiffe_namespace, workload_from_metadata

# Istio's own test data: a header value istio-proxy's peer_metadata filter tests decode (an older istio-proxy
# sent its whole node metadata, which a reader must still reduce to the workload facts).
SAMPLE = (Path(__file__).parent / "istio_sample_header.txt").read_text().strip()

NODE_METADATA = {
    "NAME": "vm-1",
    "NAMESPACE": "demo",
    "WORKLOAD_NAME": "hello",
    "CLUSTER_ID": "Kubernetes",
    "SERVICE_ACCOUNT": "hello-sa",
    "INTERCEPTION_MODE": "REDIRECT",
    "PROXY_CONFIG": {"binaryPath": "/usr/local/bin/envoy"},
    "LABELS": {
        "app": "hello",
        "version": "v2",
        "service.istio.io/canonical-name": "hello",
        "service.istio.io/canonical-revision": "v2",
        "team": "payments",
    },
    "OWNER": "kubernetes://apis/apps/v1/namespaces/demo/deployments/hello",
}


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _struct(fields: dict[str, str | dict[str, str]]) -> bytes:
    """google.protobuf.Struct, serialized deterministically: map entries in key order (Struct.fields = 1,
    entry key = 1, value = 2; Value.string_value = 3, Value.struct_value = 5)."""
    out = b""
    for key in sorted(fields):
        value = fields[key]
        v = _field(5, _struct(value)) if isinstance(value, dict) else _field(3, value.encode())  # type: ignore[arg-type]
        out += _field(1, _field(1, key.encode()) + _field(2, v))
    return out


def test_the_vm_sends_what_istio_proxy_sends_for_the_same_node() -> None:
    golden = _struct(
        {
            "NAME": "vm-1",
            "NAMESPACE": "demo",
            "WORKLOAD_NAME": "hello",
            "CLUSTER_ID": "Kubernetes",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/demo/deployments/hello",
            "REGION": "eu-west",
            "AVAILABILITY_ZONE": "eu-west-1a",
            # Only the canonical service labels and app/version travel; other labels stay home.
            "LABELS": {
                "app": "hello",
                "version": "v2",
                "service.istio.io/canonical-name": "hello",
                "service.istio.io/canonical-revision": "v2",
            },
        }
    )
    sent = header_value(workload_from_metadata(NODE_METADATA, {"region": "eu-west", "zone": "eu-west-1a"}))
    assert base64.b64decode(sent) == golden
    assert sent == base64.b64encode(golden).decode()


def test_a_sparse_vm_sends_an_empty_labels_struct_and_no_owner() -> None:
    w = workload_from_metadata({"NAMESPACE": "demo", "WORKLOAD_NAME": "hello", "OWNER": "not-a-k8s-owner"})
    assert base64.b64decode(header_value(w)) == _struct({"NAMESPACE": "demo", "WORKLOAD_NAME": "hello", "LABELS": {}})


def test_app_and_version_prefer_the_kubernetes_recommended_labels() -> None:
    w = workload_from_metadata({"LABELS": {"app": "a", "app.kubernetes.io/name": "b", "version": "1"}})
    assert (w.app, w.version) == ("b", "1")


def test_istios_sample_header_decodes_to_the_expected_workload() -> None:
    w = decode_header(SAMPLE)
    assert w is not None
    assert w.workload == "productpage-v1"
    assert w.namespace == "default"
    assert w.cluster == "client-cluster"
    assert w.canonical_name == "productpage-v1"
    assert w.canonical_revision == "version-1"
    assert (w.app, w.version) == ("productpage", "v1")
    assert w.kind == "deployment"
    assert w.instance == "productpage-v1-84975bc778-pxz2w"
    # Round trip: what istio-proxy would forward for that workload decodes to the same facts.
    assert decode_header(header_value(w)) == w


def test_istios_sample_header_becomes_the_inbound_source_labels() -> None:
    local = LocalWorkload.from_metadata(NODE_METADATA)
    principal = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    raw = Raw(
        reporter="destination",
        protocol="http",
        peer=SAMPLE,
        peer_principal=principal,
        local_principal="spiffe://cluster.local/ns/demo/sa/hello-sa",
        cluster="inbound|8080||",
        services='[{"host":"hello.demo.svc.cluster.local","name":"hello","namespace":"demo"}]',
        response_code="200",
        response_flags="-",
    )
    labels = istio_labels(raw, local)
    assert {k: v for k, v in labels.items() if k.startswith("source_")} == {
        "source_workload": "productpage-v1",
        "source_canonical_service": "productpage-v1",
        "source_canonical_revision": "version-1",
        "source_workload_namespace": "default",
        "source_principal": principal,
        "source_app": "productpage",
        "source_version": "v1",
        "source_cluster": "client-cluster",
    }
    assert labels["destination_service"] == "hello.demo.svc.cluster.local"
    assert labels["connection_security_policy"] == "mutual_tls"


def test_bad_header_values_are_no_peer() -> None:
    assert decode_header("not base64 !!") is None
    assert decode_header(base64.b64encode(b"\xff\xff\xff").decode()) is None


def test_endpoint_metadata_and_spiffe_namespace() -> None:
    w = from_endpoint("reviews-v2;bookinfo;reviews;v2;Kubernetes")
    assert w is not None
    assert (w.workload, w.namespace, w.canonical_name, w.canonical_revision, w.cluster) == (
        "reviews-v2",
        "bookinfo",
        "reviews",
        "v2",
        "Kubernetes",
    )
    assert from_endpoint("too;short") is None
    assert spiffe_namespace("spiffe://td/ns/bookinfo/sa/reviews") == "bookinfo"
    assert spiffe_namespace("spiffe://td/ns/last") == "last"
    assert spiffe_namespace("spiffe://td/sa/x") == ""
