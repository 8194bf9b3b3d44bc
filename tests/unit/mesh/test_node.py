"""istiod's reading of the node: id parts, INSTANCE_IPS, namespace fallback, metadata types."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from vm_agent.mesh.autoreg import entry_name
from vm_agent.mesh.node import NodeError, parse_node


def _node(
    node_id: str, meta: dict[str, Any] | None = None, locality: tuple[str, str, str] | None = None
) -> base_pb2.Node:
    n = base_pb2.Node(id=node_id)
    if meta is not None:
        s = struct_pb2.Struct()
        s.update(meta)
        n.metadata.CopyFrom(s)
    if locality:
        n.locality.region, n.locality.zone, n.locality.sub_zone = locality
    return n


def test_parse_vm_node() -> None:
    info = parse_node(
        _node(
            "sidecar~10.0.0.5~vm1.vm-ns~vm-ns.svc.cluster.local",
            {
                "NAMESPACE": "vm-ns",
                "INSTANCE_IPS": "127.0.0.2,::1",
                "SERVICE_ACCOUNT": "vm-sa",
                "DNS_CAPTURE": "true",
                "LABELS": {"app": "vm-app"},
                "PROXY_CONFIG": {"readinessProbe": {"tcpSocket": {"port": 80}}},
                "AUTO_REGISTER_GROUP": "vm-app",
            },
            ("r", "z", ""),
        )
    )
    assert info.ips == ("127.0.0.2", "::1")  # INSTANCE_IPS wins when all valid
    assert (info.namespace, info.service_account, info.proxy_id) == ("vm-ns", "vm-sa", "vm1.vm-ns")
    assert info.dns_capture and info.interception_mode == "REDIRECT"
    assert info.labels == {"app": "vm-app"}
    assert info.proxy_config["readinessProbe"] == {"tcpSocket": {"port": 80.0}}
    assert info.locality == "r/z"
    assert info.auto_register_group == "vm-app"


def test_fallbacks() -> None:
    info = parse_node(_node("sidecar~10.0.0.5~vm1.x~other.svc.cluster.local", {"INSTANCE_IPS": "bogus,127.0.0.9"}))
    assert info.ips == ("10.0.0.5",)  # one invalid INSTANCE_IPS entry: the id's IP is used
    assert info.namespace == "other"  # no NAMESPACE: first label of the DNS domain
    assert not info.dns_capture


@pytest.mark.parametrize(
    ("node_id", "match"),
    [
        ("", "missing"),
        ("sidecar~1.2.3.4~x", "4 parts"),
        ("gateway~1.2.3.4~x~ns.svc", "type 'gateway'"),
        ("sidecar~not-an-ip~x~ns.svc", "not an IP"),
    ],
)
def test_bad_node_ids(node_id: str, match: str) -> None:
    with pytest.raises(NodeError, match=match):
        parse_node(_node(node_id))


def test_entry_names() -> None:
    assert entry_name("wg", "1.1.1.1", "network1") == "wg-1.1.1.1-network1"
    assert entry_name("group", "1.1.1.1", "") == "group-1.1.1.1"
    assert entry_name("g", "fd00::1", "") == "g-fd00--1"
    assert len(entry_name("g" * 300, "1.1.1.1", "")) == 253
