"""Step 2 (CA half): istiod's CA signs the group's SPIFFE ID after a real TokenReview, and refuses tokens a
real kube-apiserver rejects (wrong audience, deleted service account)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography import x509

from tests.interop.conftest import VmGroup
from tests.interop.lab import TRUST_DOMAIN, ControlPlane
from tests.interop.vmclient import issue_svid, load_config
from vm_agent.config import Config
from vm_agent.identity.ca_client import CaError

pytestmark = [pytest.mark.interop]


def uri_sans(pem: str) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def config_for(vm_files: Path, tmp_path: Path) -> Config:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    return load_config(vm_files, tmp_path / "state", resolv, {})


async def test_ca_signs_the_service_account_identity(
    control_plane: ControlPlane, group: VmGroup, vm_files: Path, tmp_path: Path
) -> None:
    cfg = config_for(vm_files, tmp_path)
    _, chain = await issue_svid(cfg)
    assert len(chain) >= 2, "istiod returns leaf first and its root last"
    assert uri_sans(chain[0]) == [f"spiffe://{TRUST_DOMAIN}/ns/{group.namespace}/sa/{group.service_account}"]
    assert chain[-1].strip() == (vm_files / "root-cert.pem").read_text().strip()


async def test_ca_refuses_a_token_with_the_wrong_audience(
    control_plane: ControlPlane, group: VmGroup, vm_files: Path, tmp_path: Path
) -> None:
    cfg = config_for(vm_files, tmp_path)
    bad = tmp_path / "wrong-aud-token"
    bad.write_text(control_plane.create_token(group.namespace, group.service_account, audience="not-istio-ca"))
    with pytest.raises(CaError) as info:
        await issue_svid(cfg, token_path=bad)
    # vm-agent explains it from the token's own claims before blaming istiod.
    assert info.value.reason == "token_audience", str(info.value)
    assert "not-istio-ca" in str(info.value)


async def test_ca_refuses_the_token_of_a_deleted_service_account(
    control_plane: ControlPlane, group: VmGroup, vm_files: Path, tmp_path: Path
) -> None:
    cfg = config_for(vm_files, tmp_path)
    control_plane.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "vm-gone", "namespace": group.namespace}}
    )
    token = tmp_path / "gone-token"
    token.write_text(control_plane.create_token(group.namespace, "vm-gone"))
    # Control: the same token is good while the account exists, so the refusal below is the deletion's doing.
    _, chain = await issue_svid(cfg, token_path=token)
    assert uri_sans(chain[0]) == [f"spiffe://{TRUST_DOMAIN}/ns/{group.namespace}/sa/vm-gone"]

    control_plane.kubectl("-n", group.namespace, "delete", "serviceaccount", "vm-gone")

    async def refused() -> CaError | None:
        try:
            await issue_svid(cfg, token_path=token)
        except CaError as exc:
            return exc
        return None

    # The apiserver's informer sees the deletion a moment later.
    err = None
    for _ in range(30):
        err = await refused()
        if err is not None:
            break
        await asyncio.sleep(0.5)
    assert err is not None, "istiod still signed for a deleted service account"
    assert err.reason == "unauthenticated", str(err)
    assert "UNAUTHENTICATED" in str(err)


async def test_renewal_with_the_client_certificate_once_the_token_is_gone(
    control_plane: ControlPlane, group: VmGroup, vm_files: Path, tmp_path: Path
) -> None:
    cfg = config_for(vm_files, tmp_path)
    key, chain = await issue_svid(cfg)
    gone = tmp_path / "no-token-here"
    # Without a certificate istiod has nothing to go on...
    with pytest.raises(CaError):
        await issue_svid(cfg, token_path=gone)
    # ...with the current SVID as client certificate it renews the same identity.
    _, renewed = await issue_svid(cfg, token_path=gone, client_cert=(key, "".join(chain).encode()))
    assert uri_sans(renewed[0]) == uri_sans(chain[0])
    assert renewed[0] != chain[0]
