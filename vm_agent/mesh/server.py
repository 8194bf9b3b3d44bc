"""The local mesh control plane: one TLS port (client certificate optional, like istiod's
VerifyClientCertIfGiven) serving the CA and ADS, an optional plaintext port, the admin API, the
manifests folder watcher and the WorkloadEntry cleanup loop, all in one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import socket
import ssl
import weakref
from collections.abc import Iterator
from typing import Any

from google.protobuf import any_pb2
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream

from vm_agent.files import atomic_write
from vm_agent.logs import get_logger
from vm_agent.mesh import xdsgen
from vm_agent.mesh.admin import serve_admin
from vm_agent.mesh.ads import AdsService, Connection, Resources
from vm_agent.mesh.auth import Authenticator, AuthError, Caller
from vm_agent.mesh.autoreg import WorkloadEntryController
from vm_agent.mesh.ca import CAError, MeshCA, resolve_ttl
from vm_agent.mesh.manifests import ManifestsFolder
from vm_agent.mesh.model import MeshSnapshot
from vm_agent.mesh.nametable import name_table
from vm_agent.mesh.settings import ISTIOD_HOST, MeshSettings, split_host_port
from vm_agent.mesh.store import Key, ObjectStore, parse_yaml
from vm_agent.mesh.tokens import ServiceAccountIssuer
from vm_agent.metrics import REGISTRY, Counter
from vm_agent.proto import CA_CREATE_CERTIFICATE_PATH, NAME_TABLE_TYPE_URL, ca_pb2

log = get_logger("mesh")

CERTS_ISSUED = Counter(
    "vm_agent_mesh_certificates_issued_total", "Workload certificates signed by the local mesh CA", registry=REGISTRY
)
CA_REJECTED = Counter(
    "vm_agent_mesh_certificate_requests_rejected_total",
    "CreateCertificate calls refused by the local mesh, by reason",
    ["reason"],
    registry=REGISTRY,
)

RUNTIME_FILE = "mesh.json"
# The object store survives restarts (an API server keeps its objects too).
OBJECTS_FILE = "objects.json"

# istiod's serving certificate names besides the configured discovery host (server.go).
_ISTIOD_NAMES = ("istiod.istio-system.svc", "istiod-remote.istio-system.svc", "istio-pilot.istio-system.svc")


def bind_socket(address: str, what: str) -> socket.socket:
    host, port = split_host_port(address, what)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio only turns Nagle off (TCP_NODELAY) on sockets that do, and with Nagle
    # every response waits ~40 ms for the peer's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(f"{what}: cannot listen on {address}: {e}") from e
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_cert(stream: Stream[Any, Any]) -> dict[str, Any] | None:
    if stream.peer is None:
        return None
    return stream.peer.cert()


def is_tls(stream: Stream[Any, Any]) -> bool:
    return stream.peer is not None and stream.peer._transport.get_extra_info("ssl_object") is not None


class CertificateService:
    """istio.v1.auth.IstioCertificateService, faithful to istiod's CA server."""

    def __init__(self, mesh: MeshServer) -> None:
        self._mesh = mesh

    def __mapping__(self) -> dict[str, Handler]:
        return {
            CA_CREATE_CERTIFICATE_PATH: Handler(
                self.create_certificate,
                Cardinality.UNARY_UNARY,
                ca_pb2.IstioCertificateRequest,
                ca_pb2.IstioCertificateResponse,
            )
        }

    async def create_certificate(
        self, stream: Stream[ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        settings = self._mesh.settings
        try:
            caller = self._mesh.authenticate(stream)
        except AuthError as e:
            CA_REJECTED.labels("unauthenticated").inc()
            log.warning("CreateCertificate from %s refused: %s", stream.peer.addr() if stream.peer else "?", e)
            raise GRPCError(Status.UNAUTHENTICATED, "request authenticate failure") from e
        if caller is None:
            # Plaintext: istiod's authenticators need TLS, so the CA never answers here.
            CA_REJECTED.labels("unauthenticated").inc()
            raise GRPCError(Status.UNAUTHENTICATED, "request authenticate failure")
        identity = caller.identities[0]
        try:
            ttl = resolve_ttl(request.validity_duration, settings.default_cert_ttl_s, settings.max_cert_ttl_s)
            chain = self._mesh.ca.sign_csr(request.csr, identity, ttl)
        except CAError as e:
            CA_REJECTED.labels(e.kind).inc()
            log.warning("CreateCertificate for %s refused: %s", identity, e)
            raise GRPCError(Status.INVALID_ARGUMENT, f"CSR signing error ({e})") from e
        CERTS_ISSUED.inc()
        log.info("issued certificate for %s (ttl %ss, authenticated by %s)", identity, ttl, caller.via)
        self._mesh.record_certificate(identity.uri, ttl)
        await stream.send_message(ca_pb2.IstioCertificateResponse(cert_chain=chain))


class _ClosingServer(Server):
    """grpclib's Server.close() stops listening and cancels handlers but leaves connections open (asyncio
    servers only close clients from Python 3.13). A stopped mesh must drop its clients, as a dying istiod
    does, so agents see the disconnect at once instead of after keepalive timeouts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        made = protocol.connection_made

        def connection_made(transport: asyncio.BaseTransport) -> None:
            self._transports.add(transport)
            made(transport)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        return protocol

    def close(self) -> None:
        super().close()
        for transport in list(self._transports):
            transport.close()


class MeshServer:
    """A control plane that behaves like istiod towards a VM (it never claims to be istiod)."""

    def __init__(self, settings: MeshSettings) -> None:
        settings.validate()
        self.settings = settings
        self.ready = asyncio.Event()
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ca = MeshCA(settings.state_dir / "ca", settings.trust_domain)
        self.issuer = ServiceAccountIssuer(settings.state_dir)
        self.store = ObjectStore()
        self.authenticator = Authenticator(
            self.issuer,
            trust_domain=settings.trust_domain,
            cluster_id=settings.cluster_id,
            audiences=settings.token_audiences,
            service_account_exists=self.store.service_account_exists,
        )
        self._xds_address: str | None = None
        self._plaintext_address: str | None = None
        self._admin_url: str | None = None
        self._issued: dict[str, int] = {}
        self.workload_entries_controller = WorkloadEntryController(
            self.store, controller_name=settings.controller_name, grace_period_s=settings.grace_period_s
        )
        self.ads = AdsService(
            authenticate=self.authenticate,
            generate=self._generate,
            hooks=self.workload_entries_controller,
            version=self._push_version,
            max_stream_age_s=settings.max_stream_age_s,
        )
        self._services: list[Any] = [CertificateService(self), self.ads]
        self.manifests = (
            ManifestsFolder(settings.manifests_dir, self.store, settings.manifests_poll_s)
            if settings.manifests_dir
            else None
        )
        self.vips: dict[str, str] = {}
        self._snapshot: MeshSnapshot = self.store.snapshot()
        self._pushes = 0
        self.store.subscribe(self._on_store_change)
        self._persist_wanted = asyncio.Event()
        self._restore()

    # -- persistence ---------------------------------------------------------------------------------
    def _restore(self) -> None:
        path = self.settings.state_dir / OBJECTS_FILE
        if not path.exists():
            return
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.error("%s cannot be read (%s); starting with an empty object store", path, e)
            return
        if not isinstance(entries, list):
            log.error("%s: expected a list of objects; starting with an empty object store", path)
            return
        for problem in self.store.restore(entries, str(path)):
            log.error("skipped on restore: %s", problem)
        # The proxies that were connected to the previous process are gone: their entries start the
        # grace period now, and are kept if the proxies reconnect in time.
        self.workload_entries_controller.mark_all_disconnected()
        log.info("restored %d object(s) from %s", len(entries), path)

    def _persist(self) -> None:
        data = json.dumps(self.store.export(), separators=(",", ":")).encode()
        atomic_write(self.settings.state_dir / OBJECTS_FILE, data, 0o600)

    async def _persist_loop(self) -> None:
        try:
            while True:
                await self._persist_wanted.wait()
                # Batch a burst of updates (many proxies connecting) into one write.
                await asyncio.sleep(0.1)
                self._persist_wanted.clear()
                self._persist()
        finally:
            with contextlib.suppress(OSError):
                self._persist()

    # -- generation ----------------------------------------------------------------------------------
    def _on_store_change(self, kinds: frozenset[str]) -> None:
        if hasattr(self, "_persist_wanted"):
            self._persist_wanted.set()
        self._snapshot = self.store.snapshot()
        if self.settings.auto_allocate_vips:
            self.vips = xdsgen.allocate_vips(self._snapshot, self.vips)
        self.ads.notify_change()

    def _push_version(self) -> str:
        self._pushes += 1
        return f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}/{self._pushes}"

    def proxy_view(self, conn: Connection) -> xdsgen.ProxyView:
        node = conn.node
        assert node is not None
        return xdsgen.ProxyView(
            node_id=node.node_id,
            ips=node.ips,
            namespace=node.namespace,
            service_account=node.service_account or None,
            labels=node.labels,
            dns_capture=node.dns_capture,
            interception_mode=node.interception_mode,
            # istiod fills an empty CLUSTER_ID with its own cluster.
            cluster_id=node.cluster_id or self.settings.cluster_id,
            metadata=node.metadata,
        )

    def _generate(self, conn: Connection) -> Resources:
        snap = self._snapshot
        if conn.gen_cache is not None and conn.gen_cache[0] == snap.version:
            return conn.gen_cache[1]
        proxy = self.proxy_view(conn)
        try:
            out = xdsgen.generate(
                snap,
                proxy,
                trust_domain=self.settings.trust_domain,
                vips=self.vips,
                cluster_id=self.settings.cluster_id,
                istio_telemetry=self.settings.istio_telemetry,
            )
            table = _name_table(snap, proxy, self.vips)
        except Exception as e:
            log.exception("xDS generation for %s failed", conn.conn_id)
            if conn.gen_cache is not None:
                return conn.gen_cache[1]  # keep what the proxy has
            raise GRPCError(Status.INTERNAL, f"xDS generation failed: {e}") from e
        packed = any_pb2.Any()
        packed.Pack(table)
        out[NAME_TABLE_TYPE_URL] = {"": packed}
        conn.gen_cache = (snap.version, out)
        return out

    # -- addresses (valid once ``ready`` is set) --------------------------------------------------
    @property
    def xds_address(self) -> str:
        if self._xds_address is None:
            raise RuntimeError("mesh server is not listening yet (await ready)")
        return self._xds_address

    @property
    def plaintext_address(self) -> str | None:
        return self._plaintext_address

    @property
    def admin_url(self) -> str:
        if self._admin_url is None:
            raise RuntimeError("mesh admin API is not listening yet (await ready)")
        return self._admin_url

    @property
    def root_cert_pem(self) -> bytes:
        return self.ca.root_cert_pem

    # -- operations used by tests, the admin API and the CLI ----------------------------------------
    def mint_token(
        self,
        namespace: str,
        service_account: str,
        audiences: tuple[str, ...] = ("istio-ca",),
        ttl_seconds: int = 3600,
        not_before: int | None = None,
    ) -> str:
        return self.issuer.mint(namespace, service_account, audiences, ttl_seconds, not_before)

    def apply_yaml(self, text: str, source: str = "api") -> list[Key]:
        """Validate all documents first (ManifestError names file/object/field), then apply them."""
        return self.store.apply(parse_yaml(text, source))

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        return self.store.delete(kind, namespace, name)

    def workload_entries(self) -> list[dict[str, Any]]:
        return self.store.select("WorkloadEntry")

    def authenticate(self, stream: Stream[Any, Any]) -> Caller | None:
        """The caller's identities; None on a plaintext connection (istiod does not authenticate those)."""
        if not is_tls(stream):
            return None
        return self.authenticator.authenticate(peer_cert(stream), _metadata(stream))

    def record_certificate(self, identity: str, ttl_s: int) -> None:
        self._issued[identity] = self._issued.get(identity, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "ads": self.ads.snapshot(),
            "workload_entries": self.workload_entries_controller.snapshot(),
            "manifests": self.manifests.snapshot() if self.manifests else None,
            "vips": dict(self.vips),
            "xds_address": self._xds_address,
            "plaintext_address": self._plaintext_address,
            "admin_url": self._admin_url,
            "trust_domain": self.settings.trust_domain,
            "cluster_id": self.settings.cluster_id,
            "store_version": self.store.version,
            "certificates_issued": dict(self._issued),
        }

    # -- lifecycle ---------------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        names = tuple(dict.fromkeys((*self.settings.server_names, ISTIOD_HOST, *_ISTIOD_NAMES)))
        key_path, chain_path = self.ca.write_serving_files(names, self.settings.server_ips)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(chain_path), str(key_path))
        # Verify a client certificate when one is offered, accept a token otherwise (istiod's
        # VerifyClientCertIfGiven); grpcio's server credentials cannot express this, grpclib can.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=self.ca.root_cert_pem.decode())
        ctx.set_alpn_protocols(["h2"])
        return ctx

    async def run(self) -> None:
        servers: list[Server] = []
        socks: list[socket.socket] = []
        try:
            if self.manifests is not None:
                self.manifests.reload()
            tls_sock = bind_socket(self.settings.listen, "listen")
            socks.append(tls_sock)
            tls = _ClosingServer(self._services)
            await tls.start(sock=tls_sock, ssl=self._ssl_context())
            servers.append(tls)
            self._xds_address = _address(tls_sock)
            if self.settings.plaintext_listen:
                plain_sock = bind_socket(self.settings.plaintext_listen, "plaintext_listen")
                socks.append(plain_sock)
                plain = _ClosingServer(self._services)
                await plain.start(sock=plain_sock)
                servers.append(plain)
                self._plaintext_address = _address(plain_sock)
            async with asyncio.TaskGroup() as tg:
                for coro in self._background():
                    tg.create_task(coro)
                admin_host, admin_port = split_host_port(self.settings.admin_listen, "admin_listen")
                admin_started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                admin = tg.create_task(serve_admin(self, admin_host, admin_port, admin_started))
                await asyncio.wait([admin_started, admin], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
                if not admin_started.done():
                    admin.result()  # startup failed: raise why
                self._admin_url = admin_started.result()
                self._write_runtime_file()
                self.ready.set()
                log.info("local mesh serving on %s (TLS)", self._xds_address)
                await asyncio.Event().wait()
        finally:
            self.ready.clear()
            with contextlib.suppress(OSError):
                (self.settings.state_dir / RUNTIME_FILE).unlink()
            for server in servers:
                server.close()
            for server in servers:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await server.wait_closed()
            for s in socks:
                s.close()

    def _write_runtime_file(self) -> None:
        """Where this mesh listens, for ``vm-agent mesh get/apply/vm-files --state DIR``."""
        info = {
            "xds_address": self._xds_address,
            "plaintext_address": self._plaintext_address,
            "admin_url": self._admin_url,
            "manifests_dir": str(self.settings.manifests_dir) if self.settings.manifests_dir else None,
            "cluster_id": self.settings.cluster_id,
            "trust_domain": self.settings.trust_domain,
            "pid": os.getpid(),
        }
        atomic_write(self.settings.state_dir / RUNTIME_FILE, (json.dumps(info, indent=2) + "\n").encode(), 0o644)

    def _background(self) -> Iterator[Any]:
        yield self._persist_loop()
        yield self.workload_entries_controller.run()
        if self.manifests is not None:
            yield self.manifests.run()


def _metadata(stream: Stream[Any, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (stream.metadata or {}).items():
        if isinstance(v, str):
            out.setdefault(k.lower(), v)
    return out


def _name_table(snap: MeshSnapshot, proxy: xdsgen.ProxyView, vips: dict[str, str]) -> Any:
    return name_table(snap, proxy, vips=vips)
