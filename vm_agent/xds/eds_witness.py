"""What istiod believes about this VM's health, read from the EDS it pushes to our own Envoy.

istiod never answers a health report, but its effect is visible: with its default
``PILOT_SEND_UNHEALTHY_ENDPOINTS=false`` a WorkloadEntry that is not Healthy has no endpoint in EDS,
and a Healthy one has. When our Envoy watches a Service that selects this VM, every EDS push for that
Service therefore says whether istiod took our last report. The health schedule uses that to re-send a
report istiod lost, and to skip a confirmation istiod has already shown it took.

Reading it must cost next to nothing, since EDS pushes can be large and frequent: a response is first
searched as bytes for our address as it appears on the wire (SocketAddress.address) and for the names of
the clusters we were seen in; only a response that holds one of them has its envelope decoded, and only
the ClusterLoadAssignments that hold one of them are decoded further.
"""

from __future__ import annotations

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from vm_agent.xds.wire import Flavour, string_field

ENDPOINT_TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

# SocketAddress.address is field 2; ClusterLoadAssignment.cluster_name is field 1.
_ADDRESS_FIELD = 2
_CLUSTER_NAME_FIELD = 1
# Envoy sends traffic to these (degraded only when nothing better is left); the rest mean "not ready".
_SERVING = frozenset({health_check_pb2.UNKNOWN, health_check_pb2.HEALTHY, health_check_pb2.DEGRADED})


def address_needle(address: str) -> bytes:
    """The bytes an endpoint with this IP carries on the wire; found by a plain bytes search."""
    return string_field(_ADDRESS_FIELD, address)


class EdsWitness:
    """Tells, from EDS responses, whether istiod currently serves this VM's endpoint.

    ``observe`` answers ``True`` (an assignment holds our endpoint as serving), ``False`` (an assignment
    of a cluster we were seen in lacks it, or holds it as unhealthy) or ``None`` (the response says
    nothing about us). Only clusters our address has appeared in count: a VM no Service selects, or
    one that has never been Healthy since the agent started, is never judged.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._needle = address_needle(address)
        self._clusters: dict[str, bytes] = {}
        self.observations = 0

    @property
    def clusters(self) -> frozenset[str]:
        return frozenset(self._clusters)

    def _mentions(self, data: bytes) -> bool:
        return self._needle in data or any(n in data for n in self._clusters.values())

    def observe(self, message: bytes, flavour: Flavour) -> bool | None:
        if not self._mentions(message):
            return None
        serving: bool | None = None
        for value in _assignments(message, flavour):
            if not self._mentions(value):
                continue
            try:
                assignment = endpoint_pb2.ClusterLoadAssignment.FromString(value)
            except DecodeError:
                continue
            state = self._state_in(assignment)
            if state is None:
                continue
            serving = state if serving is None else serving or state
        if serving is not None:
            self.observations += 1
        return serving

    def _state_in(self, assignment: endpoint_pb2.ClusterLoadAssignment) -> bool | None:
        name = assignment.cluster_name
        found: bool | None = None
        for locality in assignment.endpoints:
            for lb in locality.lb_endpoints:
                if lb.endpoint.address.socket_address.address == self.address:
                    found = found or lb.health_status in _SERVING
        if found is not None:
            if name not in self._clusters:
                self._clusters[name] = string_field(_CLUSTER_NAME_FIELD, name)
            return found
        return False if name in self._clusters else None


def _assignments(message: bytes, flavour: Flavour) -> list[bytes]:
    """The serialized resources of an EDS response, still undecoded."""
    try:
        if flavour is Flavour.SOTW:
            return [r.value for r in discovery_pb2.DiscoveryResponse.FromString(message).resources]
        return [r.resource.value for r in discovery_pb2.DeltaDiscoveryResponse.FromString(message).resources]
    except DecodeError:
        return []
