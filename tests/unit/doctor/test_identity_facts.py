"""The token and certificate facts doctor's identity lines are built from, with real keys and certificates."""

from __future__ import annotations

import asyncio
import datetime as dt

from tests.unit.doctor.conftest import SPIFFE, VmFiles, intermediate
from tests.unit.identity.pki import ThrowawayCA
from vm_agent.doctor.context import Context, DoctorOptions
from vm_agent.doctor.identity import check_certificate, check_token
from vm_agent.doctor.identity_facts import (
    CertState,
    ago,
    certificate_facts,
    token_facts,
    verify_chain,
)
from vm_agent.doctor.result import CheckResult

# --- the chain against root-cert.pem ----------------------------------------------------------------------------


def test_chain_through_an_intermediate_verifies() -> None:
    root = ThrowawayCA.create("org root")
    inter = intermediate(root)
    _, leaf = inter.issue_workload(SPIFFE)
    assert verify_chain(leaf + inter.pem, root.pem) is None
    assert verify_chain(leaf + inter.pem + root.pem, root.pem) is None
    # A bundle of several roots, ours among them.
    assert verify_chain(leaf + inter.pem, ThrowawayCA.create("other").pem + root.pem) is None


def test_chain_from_another_root_is_named() -> None:
    root, other = ThrowawayCA.create("org root"), ThrowawayCA.create("another mesh")
    inter = intermediate(root)
    _, leaf = inter.issue_workload(SPIFFE)
    problem = verify_chain(leaf + inter.pem + root.pem, other.pem)
    assert problem == "the chain ends at the root O=org root, which root-cert.pem does not hold"
    # The leaf alone, without its intermediate: nothing links it to the root.
    problem = verify_chain(leaf, root.pem)
    assert problem is not None and problem.startswith("(no subject, serial ")
    assert problem.endswith("was issued by O=intermediate, which neither root-cert.pem nor the chain holds")


def test_same_name_different_key_is_not_the_signer() -> None:
    real, impostor = ThrowawayCA.create("mesh root"), ThrowawayCA.create("mesh root")
    _, leaf = real.issue_workload(SPIFFE)
    assert verify_chain(leaf, real.pem) is None
    problem = verify_chain(leaf, impostor.pem)
    assert problem is not None
    assert problem.endswith(
        "was issued by O=mesh root, and root-cert.pem holds a root of that name but with another key (another mesh's root)"
    )


# --- token facts ---------------------------------------------------------------------------------------------------


def test_good_token(files: VmFiles) -> None:
    facts = token_facts(files.config())
    assert facts.usable and facts.problem is None
    assert facts.info is not None and facts.info.audiences == ("istio-ca",)


def test_token_problems_name_the_file_and_the_fix(files: VmFiles) -> None:
    config = files.config()
    path = files.token_path

    files.set_token(aud=["kubernetes.default.svc"])
    facts = token_facts(config)
    assert facts.problem == "the token's audience is kubernetes.default.svc; istiod's CA expects istio-ca"
    assert facts.hint and "--audience istio-ca" in facts.hint and "kubectl create token vmsa -n vmns" in facts.hint

    now = dt.datetime.now(dt.UTC)
    files.set_token(exp=int(now.timestamp()) - 3 * 3600)
    facts = token_facts(config, now)
    assert facts.problem is not None and facts.problem.startswith(f"the token in {path} expired at ")
    assert facts.problem.endswith("(3h ago)")

    path.write_text("not a jwt")
    facts = token_facts(config)
    assert facts.problem == f"{path}: token is not a JWT: expected 3 dot-separated parts, found 1"

    path.write_text("\n")
    assert token_facts(config).problem == f"the token file {path} is empty"

    path.unlink()
    facts = token_facts(config)
    assert facts.problem == f"no token at {path}"
    assert facts.hint and facts.hint.startswith(f"put a fresh token at {path}")


def test_token_without_audience_is_usable(files: VmFiles) -> None:
    files.set_token(aud=None)
    facts = token_facts(files.config())
    assert facts.usable and facts.info is not None and facts.info.audiences == ()


def test_ago() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert ago(now + dt.timedelta(seconds=30), now) == "in 30s"
    assert ago(now - dt.timedelta(minutes=50), now) == "50m ago"
    assert ago(now + dt.timedelta(hours=5), now) == "in 5h"
    assert ago(now - dt.timedelta(days=9), now) == "9d ago"


# --- certificate facts ---------------------------------------------------------------------------------------------


def test_certificate_states(files: VmFiles) -> None:
    config = files.config()
    assert certificate_facts(config).state is CertState.MISSING

    files.persist()
    facts = certificate_facts(config)
    assert facts.state is CertState.VALID and facts.usable
    assert facts.spiffe_id == SPIFFE and facts.root_problem is None

    files.persist(ttl=dt.timedelta(seconds=-30))
    facts = certificate_facts(config)
    assert facts.state is CertState.EXPIRED and not facts.usable
    assert "expired at" in facts.message

    files.persist(uri="spiffe://cluster.local/ns/other/sa/else")
    facts = certificate_facts(config)
    assert facts.state is CertState.OTHER_IDENTITY
    assert facts.message == f"the certificate is for spiffe://cluster.local/ns/other/sa/else, this VM is {SPIFFE}"

    other_mesh = ThrowawayCA.create("another mesh")
    files.persist(ca=other_mesh)
    facts = certificate_facts(config)
    assert facts.state is CertState.UNTRUSTED
    assert "O=another mesh" in facts.message and str(config.paths.root_cert) in facts.message

    files.persist(ca=intermediate(files.root))  # a plugged-in CA under the mesh root
    assert certificate_facts(config).state is CertState.VALID

    (files.state / "key.pem").write_bytes(ThrowawayCA.create().issue_workload(SPIFFE)[0])
    facts = certificate_facts(config)
    assert facts.state is CertState.CORRUPT and "private key does not match" in facts.message


def test_unreadable_root_is_reported_not_fatal(files: VmFiles) -> None:
    files.persist()
    (files.dir / "root-cert.pem").write_text("garbage\n")
    facts = certificate_facts(files.config())
    assert facts.state is CertState.VALID
    assert facts.root_problem == f"{files.dir / 'root-cert.pem'} holds no PEM certificate"


# --- the two lines together ----------------------------------------------------------------------------------------


def lines(files: VmFiles) -> tuple[CheckResult, CheckResult]:
    ctx = Context(files.config(), DoctorOptions(), ("token", "certificate"))

    async def both() -> tuple[CheckResult, CheckResult]:
        return await check_token(ctx), await check_certificate(ctx)

    return asyncio.run(both())


def test_a_valid_certificate_makes_a_bad_token_harmless(files: VmFiles) -> None:
    files.token_path.unlink()
    token, cert = lines(files)
    assert (token.status.value, cert.status.value) == ("fail", "skip")
    files.persist()
    token, cert = lines(files)
    assert (token.status.value, cert.status.value) == ("ok", "ok")
    assert token.summary.startswith(f"no token at {files.token_path}; not needed: the persisted certificate")


def test_expired_certificate_with_a_good_token_is_a_warning(files: VmFiles) -> None:
    files.persist(ttl=dt.timedelta(seconds=-30))
    token, cert = lines(files)
    assert (token.status.value, cert.status.value) == ("ok", "warn")
    assert "the agent asks the CA for a new one with the token" in cert.summary


def test_token_for_another_account_is_a_warning(files: VmFiles) -> None:
    files.set_token(sub="system:serviceaccount:vmns:someone-else")
    token, _ = lines(files)
    assert token.status.value == "warn"
    assert token.summary == "the token is for service account someone-else in vmns, but cluster.env says vmsa in vmns"
