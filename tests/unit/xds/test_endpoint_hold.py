"""The reconnect endpoint hold (vm_agent/xds/endpoint_hold.py), with an injected clock."""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from vm_agent.xds.endpoint_hold import EDS_TYPE_URL, NONCE_PREFIX, EndpointHold

CLUSTER = "outbound|80||forum.forum.svc.cluster.local"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cla(name: str, *ips: str) -> bytes:
    msg = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    if ips:
        loc = msg.endpoints.add()
        for ip in ips:
            addr = loc.lb_endpoints.add().endpoint.address.socket_address
            addr.address, addr.port_value = ip, 8080
    return bytes(msg.SerializeToString())


def delta(*resources: tuple[str, bytes], removed: tuple[str, ...] = (), nonce: str = "n") -> bytes:
    out = discovery_pb2.DeltaDiscoveryResponse(type_url=EDS_TYPE_URL, nonce=nonce, removed_resources=list(removed))
    for name, value in resources:
        r = out.resources.add(name=name, version="v")
        r.resource.type_url = EDS_TYPE_URL
        r.resource.value = value
    return bytes(out.SerializeToString())


def addresses(message: bytes) -> dict[str, list[str]]:
    resp = discovery_pb2.DeltaDiscoveryResponse.FromString(message)
    out = {}
    for r in resp.resources:
        c = endpoint_pb2.ClusterLoadAssignment.FromString(r.resource.value)
        out[r.name] = [e.endpoint.address.socket_address.address for loc in c.endpoints for e in loc.lb_endpoints]
    return out


def test_outside_a_reconnect_an_emptied_cluster_empties_at_once() -> None:
    hold = EndpointHold(30, clock=Clock())
    hold.delta(delta((CLUSTER, cla(CLUSTER, "10.0.0.1"))))
    empty = delta((CLUSTER, cla(CLUSTER)))
    assert hold.delta(empty) == empty
    assert hold.held() == []


def test_after_a_reconnect_the_last_endpoints_stay_until_istiod_sends_them_again() -> None:
    clock = Clock()
    hold = EndpointHold(30, clock=clock)
    hold.delta(delta((CLUSTER, cla(CLUSTER, "10.0.0.1", "10.0.0.2"))))
    hold.reconnected()
    other = "outbound|80||new.svc.cluster.local"
    out = hold.delta(delta((CLUSTER, cla(CLUSTER)), (other, cla(other))))
    # The emptied cluster keeps its endpoints; a cluster Envoy never had endpoints for passes as it is.
    assert addresses(out) == {CLUSTER: ["10.0.0.1", "10.0.0.2"], other: []}
    assert hold.held() == [CLUSTER]
    clock.now += 5
    refill = delta((CLUSTER, cla(CLUSTER, "10.0.0.3")))
    assert hold.delta(refill) == refill
    assert hold.held() == [] and hold.release(delta=True) is None


def test_when_the_hold_ends_the_empty_update_is_delivered_by_the_agent() -> None:
    clock = Clock()
    hold = EndpointHold(30, clock=clock)
    hold.delta(delta((CLUSTER, cla(CLUSTER, "10.0.0.1"))))
    hold.reconnected()
    hold.delta(delta((CLUSTER, cla(CLUSTER))))
    assert hold.deadline() == 1030.0
    clock.now += 29
    assert hold.release(delta=True) is None
    clock.now += 2
    out = hold.release(delta=True)
    assert out is not None
    resp = discovery_pb2.DeltaDiscoveryResponse.FromString(out)
    assert resp.nonce.startswith(NONCE_PREFIX) and resp.type_url == EDS_TYPE_URL
    assert addresses(out) == {CLUSTER: []}
    assert hold.held() == [] and hold.deadline() is None
    # Once released, a later empty update is not held again (nothing known to keep).
    again = delta((CLUSTER, cla(CLUSTER)))
    assert hold.delta(again) == again


def test_a_removed_cluster_is_forgotten() -> None:
    hold = EndpointHold(30, clock=Clock())
    hold.delta(delta((CLUSTER, cla(CLUSTER, "10.0.0.1"))))
    hold.reconnected()
    hold.delta(delta(removed=(CLUSTER,)))
    empty = delta((CLUSTER, cla(CLUSTER)))
    assert hold.delta(empty) == empty


def test_state_of_the_world_responses_are_held_and_released_too() -> None:
    clock = Clock()
    hold = EndpointHold(10, clock=clock)

    def sotw(*values: bytes) -> bytes:
        resp = discovery_pb2.DiscoveryResponse(type_url=EDS_TYPE_URL, version_info="7", nonce="n")
        for v in values:
            a = resp.resources.add()
            a.type_url, a.value = EDS_TYPE_URL, v
        return bytes(resp.SerializeToString())

    hold.sotw(sotw(cla(CLUSTER, "10.0.0.1")))
    hold.reconnected()
    out = discovery_pb2.DiscoveryResponse.FromString(hold.sotw(sotw(cla(CLUSTER))))
    kept = endpoint_pb2.ClusterLoadAssignment.FromString(out.resources[0].value)
    assert kept.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address == "10.0.0.1"
    clock.now += 11
    released = hold.release(delta=False)
    assert released is not None
    resp = discovery_pb2.DiscoveryResponse.FromString(released)
    assert resp.version_info == "7" and resp.nonce.startswith(NONCE_PREFIX)
    assert not endpoint_pb2.ClusterLoadAssignment.FromString(resp.resources[0].value).endpoints


def test_a_zero_hold_turns_the_feature_off() -> None:
    hold = EndpointHold(0, clock=Clock())
    hold.delta(delta((CLUSTER, cla(CLUSTER, "10.0.0.1"))))
    hold.reconnected()
    empty = delta((CLUSTER, cla(CLUSTER)))
    assert hold.delta(empty) == empty
