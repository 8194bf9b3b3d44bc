"""Envoy keeps a cluster's last endpoints through the gap after a reconnect, instead of "no healthy upstream".

After a partition from istiod longer than its disconnect grace period (PILOT_WORKLOAD_ENTRY_GRACE_PERIOD, 10 s by
default), istiod has deleted the auto-registered WorkloadEntries of every VM it lost. When the link comes back
the VMs reconnect one by one (each after its own jittered backoff), and one that reconnects before the VMs it calls
have re-registered is pushed their services with no endpoints: Envoy answers 503 until they come back, although
those VMs never stopped serving. pilot-agent forwards that; vm-agent holds it.

For ``hold_s`` seconds after an upstream stream that followed an upstream failure delivers its first response, an
EDS update that would empty a cluster Envoy has endpoints for is given the cluster's previous endpoints instead.
The empty update is delivered when the hold ends, unless istiod sent endpoints for the cluster meanwhile. Outside
that window every update passes unchanged: a service emptied on purpose, or by failing health, empties at once.
Only EDS responses are decoded (into resources, and each ClusterLoadAssignment just enough to see whether it has
endpoints); everything else stays bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from vm_agent.logs import get_logger
from vm_agent.metrics import REGISTRY, Counter

log = get_logger("xds")

EDS_TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
NONCE_PREFIX = "vm-agent-hold-"
"""Nonce of the responses the agent itself sends Envoy; Envoy's ACKs of them stay with the agent."""

_HELD = Counter(
    "vm_agent_xds_endpoints_held",
    "Clusters whose last endpoints were kept for Envoy while a reconnect's first updates emptied them, by outcome "
    "(held, refilled: istiod sent endpoints again within the hold, released: the empty update went to Envoy)",
    ["outcome"],
    registry=REGISTRY,
)


def _has_endpoints(value: bytes) -> bool:
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(value)
    return any(locality.lb_endpoints for locality in cla.endpoints)


class EndpointHold:
    """State shared by every stream of one proxy (Envoy's endpoints outlive the streams that delivered them)."""

    def __init__(self, hold_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self._clock = clock
        self._last: dict[str, bytes] = {}
        """cluster -> the last non-empty ClusterLoadAssignment (serialized) Envoy was given"""
        self._held: dict[str, bytes] = {}
        """cluster -> istiod's empty ClusterLoadAssignment Envoy has not been given yet"""
        self._until: float | None = None
        self._version = ""
        self._nonces = itertools.count(1)
        self._due = asyncio.Event()

    # -- the window ---------------------------------------------------------------------------------

    def reconnected(self) -> None:
        """An upstream stream that followed an upstream failure delivered its first response."""
        if self.hold_s > 0:
            self._until = self._clock() + self.hold_s

    def _open(self) -> bool:
        return self._until is not None and self._clock() < self._until

    def deadline(self) -> float | None:
        """When held updates are due (monotonic clock), or None with nothing held."""
        return self._until if self._held else None

    def held(self) -> list[str]:
        return sorted(self._held)

    # -- responses on their way to Envoy -----------------------------------------------------------

    def forward(self, message: bytes, *, delta: bool) -> bytes:
        """The EDS response Envoy gets for istiod's ``message`` (itself, unless a cluster is held)."""
        try:
            out = self.delta(message) if delta else self.sotw(message)
        except DecodeError as exc:
            log.warning("cannot inspect an EDS response, forwarding it as is: %s", exc)
            return message
        if out is not message:
            log.info("keeping Envoy's endpoints of %s while the mesh reconnects", ", ".join(self.held()))
            self._due.set()
        return out

    async def release_when_due(self, write: Callable[[bytes], Awaitable[None]], *, delta: bool) -> None:
        """Runs beside a stream: when the hold ends, Envoy gets the updates istiod sent for clusters that did not
        refill meanwhile (empty ones)."""
        while True:
            deadline = self.deadline()
            if deadline is None:
                self._due.clear()
                await self._due.wait()
                continue
            await asyncio.sleep(max(0.0, deadline - self._clock()))
            message = self.release(delta=delta)
            if message is not None:
                log.info("endpoint hold over: Envoy gets istiod's empty updates")
                await write(message)

    def _one(self, name: str, value: bytes) -> bytes | None:
        """The value Envoy gets for cluster ``name`` (None: istiod's own)."""
        if _has_endpoints(value):
            self._last[name] = value
            if self._held.pop(name, None) is not None:
                _HELD.labels("refilled").inc()
            return None
        previous = self._last.get(name)
        if previous is not None and self._open():
            if name not in self._held:
                _HELD.labels("held").inc()
            self._held[name] = value
            return previous
        self._last.pop(name, None)
        self._held.pop(name, None)
        return None

    def delta(self, message: bytes) -> bytes:
        """A DeltaDiscoveryResponse for EDS, with held clusters given their previous endpoints."""
        resp = discovery_pb2.DeltaDiscoveryResponse.FromString(message)
        changed = False
        for res in resp.resources:
            if not res.HasField("resource"):
                continue
            replacement = self._one(res.name, res.resource.value)
            if replacement is not None:
                res.resource.value = replacement
                changed = True
        for name in resp.removed_resources:
            self._last.pop(name, None)
            self._held.pop(name, None)
        return resp.SerializeToString() if changed else message

    def sotw(self, message: bytes) -> bytes:
        """A DiscoveryResponse for EDS (state of the world), likewise."""
        resp = discovery_pb2.DiscoveryResponse.FromString(message)
        self._version = resp.version_info
        changed = False
        for any_ in resp.resources:
            name = endpoint_pb2.ClusterLoadAssignment.FromString(any_.value).cluster_name
            replacement = self._one(name, any_.value)
            if replacement is not None:
                any_.value = replacement
                changed = True
        return resp.SerializeToString() if changed else message

    def release(self, *, delta: bool) -> bytes | None:
        """Once the hold is over: a response of the agent's own carrying istiod's held (empty) updates."""
        if not self._held or self._open():
            return None
        nonce = f"{NONCE_PREFIX}{next(self._nonces)}"
        held, self._held = self._held, {}
        for name in held:
            self._last.pop(name, None)
        _HELD.labels("released").inc(len(held))
        if delta:
            out = discovery_pb2.DeltaDiscoveryResponse(type_url=EDS_TYPE_URL, nonce=nonce)
            for name, value in held.items():
                r = out.resources.add(name=name)
                r.resource.type_url = EDS_TYPE_URL
                r.resource.value = value
            return bytes(out.SerializeToString())
        sotw = discovery_pb2.DiscoveryResponse(type_url=EDS_TYPE_URL, nonce=nonce, version_info=self._version)
        for value in held.values():
            any_ = sotw.resources.add()
            any_.type_url = EDS_TYPE_URL
            any_.value = value
        return bytes(sotw.SerializeToString())
