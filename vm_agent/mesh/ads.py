"""ADS towards each connected proxy, SotW and Delta, with istiod's admission, version/nonce/ACK/NACK
rules and a push whenever the mesh changes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.json_format import MessageToDict
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream

from vm_agent.logs import get_logger
from vm_agent.mesh.auth import AuthError, Caller
from vm_agent.mesh.ca import SpiffeId
from vm_agent.mesh.node import NodeError, NodeInfo, parse_node
from vm_agent.metrics import REGISTRY, Counter, Gauge
from vm_agent.proto import HEALTH_INFO_TYPE_URL, NAME_TABLE_TYPE_URL

log = get_logger("mesh.ads")

SOTW_PATH = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_PATH = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# istiod pushes in this order so that a proxy never sees a reference before its target.
PUSH_ORDER = (CDS, EDS, LDS, RDS)
# Types where naming nothing means "everything" (xDS wildcard); for the others it means "nothing".
WILDCARD_TYPES = frozenset({CDS, LDS, NAME_TABLE_TYPE_URL, "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig"})
# A change to the left type makes the proxy re-warm the right one, so push it along (istiod's full push).
FOLLOWERS = {CDS: EDS, LDS: RDS}

CONNECTED = Gauge("vm_agent_mesh_xds_connections", "ADS streams open on the local mesh", registry=REGISTRY)
PUSHES = Counter("vm_agent_mesh_xds_pushes_total", "xDS responses sent by the local mesh", ["type"], registry=REGISTRY)
ACKS = Counter(
    "vm_agent_mesh_xds_acks_total", "ACK/NACK received by the local mesh", ["type", "result"], registry=REGISTRY
)

Resources = dict[str, dict[str, any_pb2.Any]]
Generator = Callable[["Connection"], Resources]


class Hooks(Protocol):
    """Auto-registration and health (istiod's WorkloadEntry controller) plug in here."""

    async def on_connect(self, conn: Connection) -> None: ...

    async def on_disconnect(self, conn: Connection) -> None: ...

    async def on_health(self, conn: Connection, healthy: bool, message: str) -> None: ...


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def resource_version(res: any_pb2.Any) -> str:
    return hashlib.sha256(res.SerializeToString(deterministic=True)).hexdigest()[:16]


def _now_text() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class TypeState:
    """What one proxy has for one type URL: subscription, what we sent, what it said about it."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    subscribed: bool = False
    # SotW: last response; Delta: versions the proxy holds, by resource name.
    nonce: str = ""
    version: str = ""
    sent_hash: str = ""
    sent_names: list[str] = field(default_factory=list)
    sent_at: str = ""
    client_versions: dict[str, str] = field(default_factory=dict)
    acked: dict[str, Any] | None = None
    nacked: dict[str, Any] | None = None
    pushes: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "subscription": "*" if self.wildcard else sorted(self.names),
            "last_pushed": {
                "version": self.version,
                "nonce": self.nonce,
                "resources": self.sent_names,
                "at": self.sent_at,
            }
            if self.nonce
            else None,
            "pushes": self.pushes,
            "acked": self.acked,
            "nacked": self.nacked,
        }


_conn_counter = itertools.count(1)


class Connection:
    def __init__(self, flavor: str, peer: str, caller: Caller | None) -> None:
        self.flavor = flavor
        self.peer = peer
        self.caller = caller
        self.node: NodeInfo | None = None
        self.identity: SpiffeId | None = None
        self.conn_id = ""
        self.connected_at = _now_text()
        self.types: dict[str, TypeState] = {}
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.name_table: dict[str, Any] | None = None
        self.workload_entry: tuple[str, str] | None = None  # (namespace, name) once bound
        self.last_health: dict[str, Any] | None = None
        # (mesh version, generated resources): one generation per proxy per change.
        self.gen_cache: tuple[int, Resources] | None = None
        self.change_pending = False

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.conn_id,
            "flavor": self.flavor,
            "peer": self.peer,
            "node_id": self.node.node_id if self.node else None,
            "namespace": self.node.namespace if self.node else None,
            "ips": list(self.node.ips) if self.node else [],
            "identities": [i.uri for i in self.caller.identities] if self.caller else [],
            "authenticated_by": self.caller.via if self.caller else None,
            "connected_at": self.connected_at,
            "workload_entry": "/".join(self.workload_entry) if self.workload_entry else None,
            "health": self.last_health,
            "types": {t: s.snapshot() for t, s in sorted(self.types.items())},
        }


class AdsService:
    """Both ADS flavours; one Connection per stream."""

    def __init__(
        self,
        *,
        authenticate: Callable[[Stream[Any, Any]], Caller | None],
        generate: Generator,
        hooks: Hooks,
        version: Callable[[], str],
        max_stream_age_s: float | None = None,
    ) -> None:
        self._authenticate = authenticate
        self._generate = generate
        self._hooks = hooks
        self._version = version
        self._max_age = max_stream_age_s
        self.connections: dict[str, Connection] = {}

    def __mapping__(self) -> dict[str, Handler]:
        return {
            SOTW_PATH: Handler(
                self.stream_sotw,
                Cardinality.STREAM_STREAM,
                discovery_pb2.DiscoveryRequest,
                discovery_pb2.DiscoveryResponse,
            ),
            DELTA_PATH: Handler(
                self.stream_delta,
                Cardinality.STREAM_STREAM,
                discovery_pb2.DeltaDiscoveryRequest,
                discovery_pb2.DeltaDiscoveryResponse,
            ),
        }

    def notify_change(self) -> None:
        for conn in list(self.connections.values()):
            # One pending "change" per proxy: a burst of store updates becomes one push.
            if not conn.change_pending:
                conn.change_pending = True
                conn.events.put_nowait(("change", None))

    def snapshot(self) -> dict[str, Any]:
        return {"connections": [c.snapshot() for c in self.connections.values()]}

    # -- the stream handlers ------------------------------------------------------------------------
    async def stream_sotw(self, stream: Stream[Any, Any]) -> None:
        await self._serve(stream, "sotw")

    async def stream_delta(self, stream: Stream[Any, Any]) -> None:
        await self._serve(stream, "delta")

    async def _serve(self, stream: Stream[Any, Any], flavor: str) -> None:
        peer_addr = stream.peer.addr() if stream.peer else None
        peer = f"{peer_addr[0]}:{peer_addr[1]}" if peer_addr else "?"
        try:
            caller = self._authenticate(stream)
        except AuthError as e:
            log.warning("ADS stream from %s refused: %s", peer, e)
            raise GRPCError(Status.UNAUTHENTICATED, "authentication failure") from e
        conn = Connection(flavor, peer, caller)
        try:
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(self._read(stream, conn))
                try:
                    await self._loop(stream, conn)
                finally:
                    reader.cancel()
        except* GRPCError as eg:
            raise eg.exceptions[0] from None
        except* (StreamTerminatedError, ConnectionError):
            # The proxy went away while we were sending: an ordinary end of stream.
            log.debug("ADS %s stream from %s ended while sending", flavor, peer)
        finally:
            # Registered streams only: a refused one never counted as connected.
            if conn.conn_id in self.connections:
                del self.connections[conn.conn_id]
                CONNECTED.dec()
                log.info("ADS %s stream %s closed", flavor, conn.conn_id)
                # Shielded: the handler is usually being cancelled (the proxy went away).
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(self._hooks.on_disconnect(conn))

    async def _read(self, stream: Stream[Any, Any], conn: Connection) -> None:
        try:
            while True:
                msg = await stream.recv_message()
                if msg is None:
                    conn.events.put_nowait(("eof", None))
                    return
                conn.events.put_nowait(("request", msg))
        except (GRPCError, StreamTerminatedError, ConnectionError, asyncio.IncompleteReadError) as e:
            conn.events.put_nowait(("eof", e))

    async def _loop(self, stream: Stream[Any, Any], conn: Connection) -> None:
        """Process requests and changes in order, until the proxy ends the stream."""
        registered = False
        loop = asyncio.get_running_loop()
        # istiod's max connection age (30 min in a default install) makes proxies reconnect now and then.
        deadline = loop.time() + self._max_age if self._max_age else None
        while True:
            if deadline is None:
                kind, payload = await conn.events.get()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        kind, payload = await conn.events.get()
                except TimeoutError:
                    log.info("ADS stream %s reached its maximum age; closing it", conn.conn_id or conn.peer)
                    return
            if kind == "eof":
                return
            if kind == "change":
                conn.change_pending = False
                if registered:
                    await self._push_all(stream, conn)
                continue
            req = payload
            if req.type_url == HEALTH_INFO_TYPE_URL:
                if not registered:
                    log.warning("ADS %s: health request before the first request with a node; ignored", conn.peer)
                    continue
                healthy = not req.HasField("error_detail")
                message = "" if healthy else req.error_detail.message
                conn.last_health = {"healthy": healthy, "message": message, "at": _now_text()}
                await self._hooks.on_health(conn, healthy, message)
                continue
            if not registered:
                await self._admit(conn, req)
                registered = True
            if conn.flavor == "sotw":
                await self._on_sotw_request(stream, conn, req)
            else:
                await self._on_delta_request(stream, conn, req)

    async def _admit(self, conn: Connection, req: Any) -> None:
        if not req.HasField("node"):
            raise GRPCError(Status.INVALID_ARGUMENT, "first request has no node: node.id is required")
        try:
            node = parse_node(req.node)
        except NodeError as e:
            raise GRPCError(Status.INVALID_ARGUMENT, str(e)) from e
        conn.node = node
        if conn.caller is not None:
            # istiod's XDS identity check: some identity must match the proxy's namespace (and SA if given).
            sa = node.service_account
            match = next(
                (
                    i
                    for i in conn.caller.identities
                    if i.namespace == node.namespace and (not sa or i.service_account == sa)
                ),
                None,
            )
            if match is None:
                ids = [i.uri for i in conn.caller.identities]
                raise GRPCError(
                    Status.PERMISSION_DENIED,
                    f"authorization failed: no identities ({ids}) matched {node.namespace}/{sa}",
                )
            conn.identity = match
        conn.conn_id = f"{node.proxy_id}-{next(_conn_counter)}"
        await self._hooks.on_connect(conn)
        self.connections[conn.conn_id] = conn
        CONNECTED.inc()
        log.info(
            "ADS %s stream %s from %s (%s) admitted",
            conn.flavor,
            conn.conn_id,
            conn.peer,
            conn.identity or "no identity",
        )

    # -- SotW -----------------------------------------------------------------------------------------
    async def _on_sotw_request(self, stream: Stream[Any, Any], conn: Connection, req: Any) -> None:
        t = req.type_url
        state = conn.types.setdefault(t, TypeState())
        names = set(req.resource_names)
        if req.response_nonce:
            if req.response_nonce != state.nonce:
                return  # stale: an answer to an older response; the newer one is in flight
            entry = {"version": req.version_info, "nonce": req.response_nonce, "at": _now_text()}
            if req.HasField("error_detail"):
                entry["message"] = req.error_detail.message
                state.nacked = entry
                ACKS.labels(_short(t), "nack").inc()
                log.warning("ADS %s NACKed %s: %s", conn.conn_id, _short(t), req.error_detail.message)
                return
            state.acked = entry
            ACKS.labels(_short(t), "ack").inc()
            wildcard = not names and t in WILDCARD_TYPES
            if wildcard == state.wildcard and names == state.names:
                return
        state.subscribed = True
        state.wildcard = not names and t in WILDCARD_TYPES
        state.names = names
        await self._push_sotw(stream, conn, t, self._generate(conn).get(t, {}), force=True)

    async def _push_sotw(
        self, stream: Stream[Any, Any], conn: Connection, t: str, resources: dict[str, any_pb2.Any], *, force: bool
    ) -> bool:
        state = conn.types[t]
        chosen = sorted(resources) if state.wildcard else sorted(n for n in state.names if n in resources)
        digest = hashlib.sha256(
            b"".join(resources[n].SerializeToString(deterministic=True) for n in chosen)
        ).hexdigest()
        if not force and digest == state.sent_hash:
            return False
        state.version = self._version()
        state.nonce = uuid.uuid4().hex
        state.sent_hash = digest
        state.sent_names = chosen
        state.sent_at = _now_text()
        state.pushes += 1
        if t == NAME_TABLE_TYPE_URL:
            conn.name_table = _name_table_json(resources)
        await stream.send_message(
            discovery_pb2.DiscoveryResponse(
                version_info=state.version,
                resources=[resources[n] for n in chosen],
                type_url=t,
                nonce=state.nonce,
            )
        )
        PUSHES.labels(_short(t)).inc()
        return True

    # -- Delta ----------------------------------------------------------------------------------------
    async def _on_delta_request(self, stream: Stream[Any, Any], conn: Connection, req: Any) -> None:
        t = req.type_url
        first = t not in conn.types
        state = conn.types.setdefault(t, TypeState())
        if req.response_nonce and req.response_nonce == state.nonce:
            entry = {"version": state.version, "nonce": req.response_nonce, "at": _now_text()}
            if req.HasField("error_detail"):
                entry["message"] = req.error_detail.message
                state.nacked = entry
                ACKS.labels(_short(t), "nack").inc()
                log.warning("ADS %s NACKed %s: %s", conn.conn_id, _short(t), req.error_detail.message)
                # The proxy keeps what it had before; forget what we thought it accepted.
                for n in state.sent_names:
                    state.client_versions.pop(n, None)
            else:
                state.acked = entry
                ACKS.labels(_short(t), "ack").inc()
        subscribe = set(req.resource_names_subscribe)
        unsubscribe = set(req.resource_names_unsubscribe)
        if first:
            state.subscribed = True
            # Legacy wildcard: the first request for a type naming nothing subscribes to everything.
            state.wildcard = (not subscribe and t in WILDCARD_TYPES) or "*" in subscribe
            state.client_versions = dict(req.initial_resource_versions)
        elif "*" in subscribe:
            state.wildcard = True
        if "*" in unsubscribe:
            state.wildcard = False
        state.names |= subscribe - {"*"}
        state.names -= unsubscribe
        for n in unsubscribe:
            state.client_versions.pop(n, None)
        if first or subscribe:
            await self._push_delta(stream, conn, t, self._generate(conn).get(t, {}), force=True)

    async def _push_delta(
        self,
        stream: Stream[Any, Any],
        conn: Connection,
        t: str,
        resources: dict[str, any_pb2.Any],
        *,
        force: bool,
        resend: bool = False,
    ) -> bool:
        state = conn.types[t]
        wanted = set(resources) if state.wildcard else {n for n in state.names if n in resources}
        changed = sorted(n for n in wanted if resend or state.client_versions.get(n) != resource_version(resources[n]))
        removed = sorted(set(state.client_versions) - wanted)
        if not changed and not removed and not force:
            return False
        state.version = self._version()
        state.nonce = uuid.uuid4().hex
        state.sent_names = changed
        state.sent_at = _now_text()
        state.pushes += 1
        out = []
        for n in changed:
            v = resource_version(resources[n])
            state.client_versions[n] = v
            out.append(discovery_pb2.Resource(name=n, version=v, resource=resources[n]))
        for n in removed:
            state.client_versions.pop(n, None)
        if t == NAME_TABLE_TYPE_URL and (changed or removed):
            conn.name_table = _name_table_json(resources)
        await stream.send_message(
            discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=state.version,
                resources=out,
                type_url=t,
                nonce=state.nonce,
                removed_resources=removed,
            )
        )
        PUSHES.labels(_short(t)).inc()
        return True

    # -- pushes on change ---------------------------------------------------------------------------
    async def _push_all(self, stream: Stream[Any, Any], conn: Connection) -> None:
        generated = self._generate(conn)
        subscribed = [t for t, s in conn.types.items() if s.subscribed]
        order = [t for t in PUSH_ORDER if t in subscribed] + sorted(t for t in subscribed if t not in PUSH_ORDER)
        pushed: set[str] = set()
        for t in order:
            # A proxy re-warms the targets of what changed (EDS of a new cluster, RDS of a new listener).
            follow = any(FOLLOWERS.get(p) == t for p in pushed)
            resources = generated.get(t, {})
            if conn.flavor == "sotw":
                sent = await self._push_sotw(stream, conn, t, resources, force=follow)
            else:
                sent = await self._push_delta(stream, conn, t, resources, force=False, resend=follow)
            if sent:
                pushed.add(t)


def _name_table_json(resources: dict[str, any_pb2.Any]) -> dict[str, Any]:
    from vm_agent.proto import nds_pb2

    table = nds_pb2.NameTable()
    for res in resources.values():
        res.Unpack(table)
        break
    return MessageToDict(table)


__all__ = ["AdsService", "Connection", "Hooks", "Resources", "TypeState", "resource_version"]
