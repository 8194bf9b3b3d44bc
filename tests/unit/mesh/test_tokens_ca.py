"""Service-account tokens and the mesh CA, as pure logic (real keys, real signatures)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from vm_agent.mesh.ca import CAError, MeshCA, SpiffeId, resolve_ttl
from vm_agent.mesh.store import ManifestErrors, ObjectStore, parse_yaml, rfc3339_nano
from vm_agent.mesh.tokens import ServiceAccountIssuer, TokenError


def _csr(uri: str = "spiffe://somewhere.else/ns/evil/sa/root") -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    return csr.public_bytes(Encoding.PEM).decode()


def test_token_round_trip_and_claims(tmp_path: Path) -> None:
    issuer = ServiceAccountIssuer(tmp_path)
    token = issuer.mint("vm-ns", "vm-sa", ttl_seconds=600)
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["sub"] == "system:serviceaccount:vm-ns:vm-sa"
    assert claims["aud"] == ["istio-ca"]
    assert claims["exp"] - claims["iat"] == 600
    subject = issuer.verify(token, ("istio-ca",))
    assert (subject.namespace, subject.service_account) == ("vm-ns", "vm-sa")


def test_token_rejections(tmp_path: Path) -> None:
    issuer = ServiceAccountIssuer(tmp_path / "a")
    other = ServiceAccountIssuer(tmp_path / "b")
    now = int(time.time())
    with pytest.raises(TokenError, match="audiences"):
        issuer.verify(issuer.mint("ns", "sa", audiences=("kubernetes",)), ("istio-ca",))
    with pytest.raises(TokenError, match="expired"):
        issuer.verify(issuer.mint("ns", "sa", ttl_seconds=10, now=now - 100), ("istio-ca",))
    with pytest.raises(TokenError, match="not valid yet"):
        issuer.verify(issuer.mint("ns", "sa", not_before=now + 100), ("istio-ca",))
    with pytest.raises(TokenError, match="signature"):
        issuer.verify(other.mint("ns", "sa"), ("istio-ca",))
    with pytest.raises(TokenError, match="JWT"):
        issuer.verify("not-a-token", ("istio-ca",))
    good = issuer.mint("ns", "sa")
    head, body, sig = good.split(".")
    forged = json.loads(base64.urlsafe_b64decode(body + "=="))
    forged["sub"] = "system:serviceaccount:kube-system:admin"
    body2 = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="signature"):
        issuer.verify(f"{head}.{body2}.{sig}", ("istio-ca",))


def test_issuer_key_persists(tmp_path: Path) -> None:
    token = ServiceAccountIssuer(tmp_path).mint("ns", "sa")
    assert ServiceAccountIssuer(tmp_path).verify(token, ("istio-ca",)).namespace == "ns"
    assert (tmp_path / "sa-signer-key.pem").stat().st_mode & 0o777 == 0o600


def test_ca_signs_caller_identity_not_csr_san(tmp_path: Path) -> None:
    ca = MeshCA(tmp_path / "ca", "cluster.local")
    chain = ca.sign_csr(_csr(), SpiffeId("cluster.local", "vm-ns", "vm-sa"), 3600)
    assert len(chain) == 2
    assert chain[1].encode() == ca.root_cert_pem
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/vm-ns/sa/vm-sa"]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == 3600
    leaf.verify_directly_issued_by(ca.root_cert)


def test_ca_root_survives_restart(tmp_path: Path) -> None:
    first = MeshCA(tmp_path / "ca", "cluster.local").root_cert_pem
    assert MeshCA(tmp_path / "ca", "cluster.local").root_cert_pem == first
    assert MeshCA(tmp_path / "other", "cluster.local").root_cert_pem != first


def test_ca_rejects_bad_csr(tmp_path: Path) -> None:
    ca = MeshCA(tmp_path / "ca", "cluster.local")
    with pytest.raises(CAError, match="csr"):
        ca.sign_csr("garbage", SpiffeId("cluster.local", "a", "b"), 60)


def test_ttl_rules() -> None:
    assert resolve_ttl(0, 86400, 1000000) == 86400
    assert resolve_ttl(-5, 86400, 1000000) == 86400
    assert resolve_ttl(10, 86400, 1000000) == 10
    with pytest.raises(CAError, match="max allowed"):
        resolve_ttl(1000001, 86400, 1000000)


def test_spiffe_parse() -> None:
    assert SpiffeId.parse("spiffe://td/ns/a/sa/b") == SpiffeId("td", "a", "b")
    assert SpiffeId.parse("spiffe://td/ns/a") is None
    assert SpiffeId.parse("https://td/ns/a/sa/b") is None


def test_manifest_errors_name_file_object_field() -> None:
    text = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {namespace: x}\n---\nkind: Gizmo\nmetadata: {name: g}\n"
    with pytest.raises(ManifestErrors) as info:
        parse_yaml(text, "sa.yaml")
    problems = [str(e) for e in info.value.errors]
    assert any(p.startswith("sa.yaml: ServiceAccount x/?: metadata.name") for p in problems), problems
    assert any("kind" in p and "Gizmo" in p for p in problems), problems


def test_store_default_service_account_and_gc() -> None:
    store = ObjectStore()
    assert store.service_account_exists("default", "default")
    assert not store.service_account_exists("vm-ns", "default")
    store.apply(parse_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: vm-ns}\n", "t"))
    assert store.service_account_exists("vm-ns", "default")
    assert not store.service_account_exists("vm-ns", "vm-sa")


def test_store_assigns_cluster_ip_keeps_status_and_collects_owned() -> None:
    store = ObjectStore()
    seen: list[frozenset[str]] = []
    store.subscribe(seen.append)
    svc = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {ports: [{port: 80}]}\n"
    store.apply(parse_yaml(svc, "t"))
    ip = store.get("Service", "ns", "a")["spec"]["clusterIP"]  # type: ignore[index]
    assert ip.startswith("10.9")
    store.apply(parse_yaml(svc, "t"))  # unchanged: no new version, no notification, same IP
    assert len(seen) == 1
    assert store.get("Service", "ns", "a")["spec"]["clusterIP"] == ip  # type: ignore[index]
    snap = store.snapshot()
    assert ("Service", "ns", "a") in snap.objects
    wg = (
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g, namespace: ns}\n"
        "spec: {template: {serviceAccount: sa}}\n"
    )
    store.apply(parse_yaml(wg, "t"))
    uid = store.get("WorkloadGroup", "ns", "g")["metadata"]["uid"]  # type: ignore[index]
    store.apply(
        [
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "WorkloadEntry",
                "metadata": {
                    "name": "g-127.0.0.2",
                    "namespace": "ns",
                    "ownerReferences": [
                        {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup", "name": "g", "uid": uid}
                    ],
                },
                "spec": {"address": "127.0.0.2"},
            }
        ]
    )
    assert store.select("WorkloadEntry")
    assert store.delete("WorkloadGroup", "ns", "g")
    assert store.select("WorkloadEntry") == []


def test_rfc3339_nano_trims_zeros() -> None:
    import datetime as dt

    assert rfc3339_nano(dt.datetime(2024, 1, 2, 3, 4, 5, 120000, tzinfo=dt.UTC)) == "2024-01-02T03:04:05.12Z"
    assert rfc3339_nano(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)) == "2024-01-02T03:04:05Z"


def test_settings_validation(tmp_path: Path) -> None:
    from vm_agent.mesh.settings import MeshSettings

    MeshSettings(state_dir=tmp_path).validate()
    bad = {
        "admin_listen": ("10.1.2.3:15014", "loopback"),
        "listen": ("nonsense", "HOST:PORT"),
        "max_cert_ttl_s": (0, "must be positive"),
        "grace_period_s": (-1.0, "negative"),
        "server_ips": (("istiod",), "not an IP"),
        "manifests_dir": (tmp_path / "missing", "not a folder"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            MeshSettings(state_dir=tmp_path, **{field: value}).validate()  # type: ignore[arg-type]
