"""vm_agent.upstream against a real TLS gRPC server on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from pathlib import Path

import pytest
from grpclib.client import UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.unit.identity.ca_server import LocalCAServer
from tests.unit.identity.pki import ThrowawayCA, make_jwt
from vm_agent.identity.csr import generate_key_and_csr
from vm_agent.proto import CA_CREATE_CERTIFICATE_PATH, ca_pb2
from vm_agent.upstream import (
    UpstreamError,
    UpstreamSettings,
    call_metadata,
    describe_token,
    open_channel,
    read_token,
)


def _settings(tmp_path: Path, server: LocalCAServer, **kw: object) -> UpstreamSettings:
    values: dict[str, object] = {
        "address": "istiod.istio-system.svc:15012",
        "dial_target": server.address,
        "server_name": "istiod.istio-system.svc",
        "root_cert_path": server.root_path,
        "token_path": tmp_path / "istio-token",
        "cluster_id": "Kubernetes",
    }
    values.update(kw)
    return UpstreamSettings(**values)  # type: ignore[arg-type]


def _token(sub: str = "system:serviceaccount:ns1:sa1", aud: object = "istio-ca", ttl: int = 3600) -> str:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    return make_jwt({"sub": sub, "aud": aud, "iat": now, "exp": now + ttl})


def test_read_token_strips_and_rereads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = UpstreamSettings("a:1", "127.0.0.1:1", "a", tmp_path / "r", tmp_path / "tok", "c1")
    with caplog.at_level(logging.WARNING):
        assert read_token(s) is None
        assert read_token(s) is None
    assert sum("does not exist" in r.getMessage() for r in caplog.records) == 1
    (tmp_path / "tok").write_text("  abc.def.ghi\n")
    assert read_token(s) == "abc.def.ghi"
    (tmp_path / "tok").write_text("second")
    assert read_token(s) == "second"
    (tmp_path / "tok").write_text("\n")
    assert read_token(s) is None


def test_call_metadata_order_and_lowercase(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("t0k\n")
    s = UpstreamSettings("a:1", "127.0.0.1:1", "a", tmp_path / "r", tmp_path / "tok", "c1", (("X-Extra", "v"),))
    assert call_metadata(s) == (("authorization", "Bearer t0k"), ("clusterid", "c1"), ("x-extra", "v"))
    s2 = UpstreamSettings("a:1", "127.0.0.1:1", "a", tmp_path / "r", None, "")
    assert call_metadata(s2) == (("clusterid", ""),)


def test_describe_token() -> None:
    info = describe_token(make_jwt({"sub": "s", "aud": ["a", "istio-ca"], "exp": 2_000_000_000, "iat": 1_900_000_000}))
    assert info.subject == "s"
    assert info.audiences == ("a", "istio-ca")
    assert info.expires_at == dt.datetime(2033, 5, 18, 3, 33, 20, tzinfo=dt.UTC)
    assert info.issued_at is not None
    assert info.issued_at < info.expires_at
    assert describe_token(make_jwt({})).audiences == ()
    for bad in ("notajwt", "a.b", "a.!!!.c", make_jwt({"aud": 5}), make_jwt({"exp": "soon"})):
        with pytest.raises(ValueError) as err:
            describe_token(bad)
        assert bad not in str(err.value) or len(bad) < 10


def test_missing_root_file_is_named(tmp_path: Path) -> None:
    s = UpstreamSettings("istiod:15012", "127.0.0.1:1", "istiod", tmp_path / "nope.pem", None, "")
    with pytest.raises(UpstreamError, match=r"nope\.pem"):
        open_channel(s, None)
    (tmp_path / "bad.pem").write_text("hello")
    s = UpstreamSettings("istiod:15012", "127.0.0.1:1", "istiod", tmp_path / "bad.pem", None, "")
    with pytest.raises(UpstreamError, match="no PEM certificate"):
        open_channel(s, None)


async def _call(settings: UpstreamSettings, client: tuple[bytes, bytes] | None) -> ca_pb2.IstioCertificateResponse:
    _, csr = generate_key_and_csr("spiffe://cluster.local/ns/ns1/sa/sa1")
    async with open_channel(settings, lambda: client) as channel:
        create: UnaryUnaryMethod[ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse] = UnaryUnaryMethod(
            channel, CA_CREATE_CERTIFICATE_PATH, ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse
        )
        req = ca_pb2.IstioCertificateRequest(csr=csr.decode(), validity_duration=60)
        resp: ca_pb2.IstioCertificateResponse = await create(req, metadata=call_metadata(settings), timeout=10)
        return resp


async def test_token_and_client_cert_reach_server(tmp_path: Path) -> None:
    async with LocalCAServer() as server:
        settings = _settings(tmp_path, server, extra_metadata=(("x-ca", "1"),))
        with pytest.raises(GRPCError) as err:
            await _call(settings, None)
        assert err.value.status is Status.UNAUTHENTICATED

        (tmp_path / "istio-token").write_text(_token() + "\n")
        resp = await _call(settings, None)
        assert len(resp.cert_chain) == 2
        md = server.calls[-1].metadata
        assert md["authorization"] == "Bearer " + _token_value(tmp_path)
        assert md["clusterid"] == "Kubernetes"
        assert md["x-ca"] == "1"
        assert server.calls[-1].client_uri is None

        # No token, but a certificate from the mesh CA: the server sees the client certificate.
        (tmp_path / "istio-token").unlink()
        client = server.ca.issue_workload("spiffe://cluster.local/ns/ns1/sa/sa1")
        client_pair = (client[0], client[1] + server.ca.pem)
        resp = await _call(settings, client_pair)
        assert server.calls[-1].client_uri == "spiffe://cluster.local/ns/ns1/sa/sa1"
        assert "authorization" not in server.calls[-1].metadata


def _token_value(tmp_path: Path) -> str:
    return (tmp_path / "istio-token").read_text().strip()


async def test_wrong_root_or_name_is_rejected(tmp_path: Path) -> None:
    other = ThrowawayCA.create("other root")
    (tmp_path / "other.pem").write_bytes(other.pem)
    (tmp_path / "istio-token").write_text(_token())
    async with LocalCAServer() as server:
        for settings in (
            _settings(tmp_path, server, root_cert_path=tmp_path / "other.pem"),
            _settings(tmp_path, server, server_name="istiod.other.svc"),
        ):
            # The handshake fails before any call: istiod is not who root-cert.pem and the name say.
            with pytest.raises(ssl.SSLCertVerificationError):
                await _call(settings, None)
        assert server.calls == []


async def test_diagnose_connection_names_each_cause(tmp_path: Path) -> None:
    from tests.helpers.net import free_port
    from vm_agent.upstream import diagnose_connection

    other = ThrowawayCA.create("other root")
    (tmp_path / "other.pem").write_bytes(other.pem)
    async with LocalCAServer() as server:
        assert await diagnose_connection(_settings(tmp_path, server)) is None
        wrong_root = await diagnose_connection(_settings(tmp_path, server, root_cert_path=tmp_path / "other.pem"))
        assert wrong_root is not None
        assert f"not signed by {tmp_path / 'other.pem'}" in wrong_root
        wrong_name = await diagnose_connection(_settings(tmp_path, server, server_name="istiod.elsewhere.svc"))
        assert wrong_name is not None
        assert "not valid for the name 'istiod.elsewhere.svc'" in wrong_name
        port = free_port()
        gone = await diagnose_connection(_settings(tmp_path, server, dial_target=f"127.0.0.1:{port}"))
        assert gone is not None
        assert gone.startswith(f"CA unreachable at istiod.istio-system.svc:15012 (127.0.0.1:{port})")
