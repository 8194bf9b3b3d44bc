"""Reading istiod's view of this VM's health from EDS responses (SotW and Delta)."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from vm_agent.xds.eds_witness import ENDPOINT_TYPE_URL, EdsWitness, address_needle
from vm_agent.xds.wire import Flavour

ME = "10.200.0.7"
MINE = "outbound|8080||vm-app.vm-ns.svc.cluster.local"
OTHER = "outbound|443||kubernetes.default.svc.cluster.local"


def assignment(cluster: str, *endpoints: tuple[str, int]) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster)
    group = cla.endpoints.add()
    for address, status in endpoints:
        lb = group.lb_endpoints.add()
        lb.endpoint.address.socket_address.address = address
        lb.endpoint.address.socket_address.port_value = 8080
        lb.health_status = status
    return cla


def response(flavour: Flavour, *assignments: endpoint_pb2.ClusterLoadAssignment) -> bytes:
    packed = []
    for cla in assignments:
        a = any_pb2.Any()
        a.Pack(cla)
        packed.append(a)
    if flavour is Flavour.SOTW:
        return bytes(discovery_pb2.DiscoveryResponse(type_url=ENDPOINT_TYPE_URL, resources=packed).SerializeToString())
    return bytes(
        discovery_pb2.DeltaDiscoveryResponse(
            type_url=ENDPOINT_TYPE_URL,
            resources=[
                discovery_pb2.Resource(name=c.cluster_name, resource=a)
                for c, a in zip(assignments, packed, strict=True)
            ],
        ).SerializeToString()
    )


HEALTHY = health_check_pb2.HEALTHY
UNHEALTHY = health_check_pb2.UNHEALTHY


def test_needle_is_the_address_as_it_is_on_the_wire() -> None:
    cla = assignment(MINE, (ME, HEALTHY))
    assert address_needle(ME) in cla.SerializeToString()
    # A longer address that starts with ours is not ours: the length byte is part of the needle.
    assert address_needle(ME) not in assignment(MINE, (ME + "1", HEALTHY)).SerializeToString()


@pytest.mark.parametrize("flavour", [Flavour.SOTW, Flavour.DELTA])
def test_present_absent_and_unrelated(flavour: Flavour) -> None:
    w = EdsWitness(ME)
    # Before our address was ever seen, no cluster is "ours": an assignment without us says nothing.
    assert w.observe(response(flavour, assignment(MINE, ("10.200.0.8", HEALTHY))), flavour) is None
    assert w.observe(response(flavour, assignment(MINE, (ME, HEALTHY), ("10.200.0.8", HEALTHY))), flavour) is True
    assert w.clusters == {MINE}
    # istiod took "unhealthy": the endpoint is gone from our cluster.
    assert w.observe(response(flavour, assignment(MINE, ("10.200.0.8", HEALTHY))), flavour) is False
    # A push of another cluster only (incremental EDS) says nothing about us.
    assert w.observe(response(flavour, assignment(OTHER, ("10.96.0.1", HEALTHY))), flavour) is None
    # Sent but marked unhealthy (PILOT_SEND_UNHEALTHY_ENDPOINTS) means not serving.
    assert w.observe(response(flavour, assignment(MINE, (ME, UNHEALTHY))), flavour) is False
    assert w.observe(response(flavour, assignment(MINE, (ME, health_check_pb2.UNKNOWN))), flavour) is True


def test_serving_in_any_of_our_clusters_wins() -> None:
    w = EdsWitness(ME)
    subset = "outbound|8080|v1|vm-app.vm-ns.svc.cluster.local"
    assert w.observe(response(Flavour.SOTW, assignment(MINE, (ME, HEALTHY)), assignment(subset, (ME, HEALTHY))),
                     Flavour.SOTW) is True  # fmt: skip
    assert w.clusters == {MINE, subset}
    msg = response(Flavour.SOTW, assignment(MINE, (ME, HEALTHY)), assignment(subset, ("10.1.1.1", HEALTHY)))
    assert w.observe(msg, Flavour.SOTW) is True
    msg = response(Flavour.SOTW, assignment(MINE), assignment(subset))
    assert w.observe(msg, Flavour.SOTW) is False


def test_garbage_says_nothing() -> None:
    w = EdsWitness(ME)
    assert w.observe(b"\x0a\x05" + address_needle(ME), Flavour.SOTW) is None
