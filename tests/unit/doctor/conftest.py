"""istioctl-style files in a temporary folder, with a throwaway mesh root, for doctor's pure parts."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.unit.identity.pki import ThrowawayCA, make_jwt
from vm_agent.config import Config, Options, load
from vm_agent.identity.store import write_svid_files

NS, SA = "vmns", "vmsa"
SPIFFE = f"spiffe://cluster.local/ns/{NS}/sa/{SA}"


def intermediate(root: ThrowawayCA, name: str = "intermediate") -> ThrowawayCA:
    """A CA signed by ``root``, as a plugged-in istiod CA is signed by the organisation's root."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    return ThrowawayCA(key, cert)


class VmFiles:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "files"
        self.dir.mkdir()
        self.state = tmp / "state"
        self.resolv = tmp / "resolv.conf"
        self.resolv.write_text("nameserver 127.0.0.53\n")
        self.root = ThrowawayCA.create("mesh root")
        (self.dir / "cluster.env").write_text(
            f"ISTIO_NAMESPACE='{NS}'\nSERVICE_ACCOUNT='{SA}'\nISTIO_SVC_IP=127.0.0.1\n"
        )
        (self.dir / "mesh.yaml").write_text("defaultConfig:\n  interceptionMode: NONE\n")
        (self.dir / "hosts").write_text("127.0.0.1 istiod.istio-system.svc\n")
        (self.dir / "root-cert.pem").write_bytes(self.root.pem)
        self.set_token()

    @property
    def token_path(self) -> Path:
        return self.dir / "istio-token"

    def set_token(self, **claims: object) -> str:
        now = int(time.time())
        payload: dict[str, object] = {
            "aud": ["istio-ca"],
            "exp": now + 3600,
            "iat": now,
            "sub": f"system:serviceaccount:{NS}:{SA}",
        }
        payload.update(claims)
        token = make_jwt({k: v for k, v in payload.items() if v is not None})
        self.token_path.write_text(token)
        return token

    def persist(
        self, ca: ThrowawayCA | None = None, uri: str = SPIFFE, ttl: dt.timedelta = dt.timedelta(hours=1)
    ) -> None:
        """A key and chain in the state folder as the agent writes them (leaf + the issuer chain up to the root)."""
        issuer = ca or self.root
        key, leaf = issuer.issue_workload(uri, ttl)
        is_intermediate = issuer.cert.issuer != issuer.cert.subject
        chain = leaf + issuer.pem + (self.root.pem if is_intermediate else b"")
        write_svid_files(self.state, key, chain, self.root.pem, public_mode=0o600)

    def config(self, **env: str) -> Config:
        return load(
            Options(
                config_dir=self.dir,
                state_dir=self.state,
                resolv_conf=self.resolv,
                environ={},
                extra_env={"VM_AGENT_SCAN_INTERFACES": "false", **env},
            )
        )


@pytest.fixture
def files(tmp_path: Path) -> VmFiles:
    return VmFiles(tmp_path)
