"""A small istiod-like CA for identity tests: a real gRPC server over real TLS on 127.0.0.1.

It authenticates like istiod (a client certificate's SPIFFE SAN, else a bearer JWT with audience
``istio-ca``) and answers ``CreateCertificate`` the way istiod does (leaf, then the root as the last element).
grpclib is used because, unlike grpcio, it lets one port accept a client certificate *or* a token.
"""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from tests.helpers.net import free_port
from tests.unit.identity.pki import ThrowawayCA
from vm_agent.proto import ca_pb2
from vm_agent.upstream import describe_token


@dataclass
class CallRecord:
    metadata: dict[str, str]
    client_uri: str | None
    csr: str
    validity_duration: int
    cert_signer: str


@dataclass
class LocalCAServer:
    ca: ThrowawayCA = field(default_factory=ThrowawayCA.create)
    trust_domain: str = "cluster.local"
    cert_ttl: dt.timedelta | None = None
    """Overrides the requested validity (to get 10-second certificates)."""
    empty_chain: bool = False
    fail_with: list[Status] = field(default_factory=list)
    """Statuses to answer the next calls with, first to last (istiod shedding load, say)."""
    attempt_times: list[float] = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    port: int = 0
    _server: Server | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/istio.v1.auth.IstioCertificateService/CreateCertificate": Handler(
                self._create,
                Cardinality.UNARY_UNARY,
                ca_pb2.IstioCertificateRequest,
                ca_pb2.IstioCertificateResponse,
            )
        }

    def _identity(self, stream: Stream[Any, Any], metadata: dict[str, str]) -> str:
        peer = stream.peer.cert() if stream.peer else None
        if peer:
            for kind, value in peer.get("subjectAltName", ()):
                if kind == "URI" and value.startswith("spiffe://"):
                    return str(value)
        auth = metadata.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise GRPCError(Status.UNAUTHENTICATED, "request authenticate failure: no credentials")
        try:
            info = describe_token(auth[len("Bearer ") :])
        except ValueError as exc:
            raise GRPCError(Status.UNAUTHENTICATED, f"request authenticate failure: {exc}") from exc
        if "istio-ca" not in info.audiences:
            raise GRPCError(Status.UNAUTHENTICATED, "request authenticate failure: audience")
        if info.expired():
            raise GRPCError(Status.UNAUTHENTICATED, "request authenticate failure: token expired")
        parts = (info.subject or "").split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise GRPCError(Status.UNAUTHENTICATED, "request authenticate failure: subject")
        return f"spiffe://{self.trust_domain}/ns/{parts[2]}/sa/{parts[3]}"

    async def _create(self, stream: Stream[Any, Any]) -> None:
        req = await stream.recv_message()
        assert req is not None
        self.attempt_times.append(time.monotonic())
        if self.fail_with:
            raise GRPCError(self.fail_with.pop(0), "try again later")
        metadata = {k: v for k, v in stream.metadata.items() if isinstance(v, str)} if stream.metadata else {}
        uri = self._identity(stream, metadata)
        signer = req.metadata.fields["CertSigner"].string_value if "CertSigner" in req.metadata.fields else ""
        self.calls.append(
            CallRecord(
                metadata, uri if stream.peer and stream.peer.cert() else None, req.csr, req.validity_duration, signer
            )
        )
        if self.empty_chain:
            await stream.send_message(ca_pb2.IstioCertificateResponse(cert_chain=[]))
            return
        ttl = self.cert_ttl or dt.timedelta(seconds=req.validity_duration or 86400)
        leaf = self.ca.sign_csr(req.csr.encode(), uri, ttl)
        await stream.send_message(
            ca_pb2.IstioCertificateResponse(cert_chain=[leaf.decode().rstrip("\n") + "\n", self.ca.pem.decode()])
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def root_path(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name) / "root-cert.pem"

    async def start(self, port: int | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        key_pem, cert_pem = self.ca.issue_server()
        (tmp / "key.pem").write_bytes(key_pem)
        (tmp / "cert.pem").write_bytes(cert_pem)
        self.root_path.write_bytes(self.ca.pem)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
        ctx.load_verify_locations(cadata=self.ca.pem.decode())
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.set_alpn_protocols(["h2"])
        self.port = port or free_port()
        self._server = Server([self])
        await self._server.start("127.0.0.1", self.port, ssl=ctx)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> LocalCAServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
