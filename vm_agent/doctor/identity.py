"""Checks 2 and 3: the bootstrap token and the persisted workload certificate.

product.md: the token is needed only until the first certificate. So a bad token with a valid persisted
certificate is fine, and a missing certificate with a good token is only "not issued yet".
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from vm_agent.doctor.context import Context
from vm_agent.doctor.identity_facts import CertState, ago
from vm_agent.doctor.result import CheckResult, fail, ok, skip, warn
from vm_agent.identity.store import CHAIN_FILE, KEY_FILE
from vm_agent.upstream import ISTIO_CA_AUDIENCE

TOKEN = "token"
CERTIFICATE = "certificate"

_SA_PREFIX = "system:serviceaccount:"


async def check_token(ctx: Context) -> CheckResult:
    facts, cert = ctx.token, ctx.certificate
    now = datetime.now(UTC)
    details: dict[str, Any] = {"path": str(facts.path)}
    if facts.info is not None:
        details["audiences"] = list(facts.info.audiences)
        details["subject"] = facts.info.subject
        details["expires_at"] = facts.info.expires_at.isoformat() if facts.info.expires_at else None
    if not facts.usable:
        assert facts.problem is not None and facts.hint is not None
        if cert.usable:
            return ok(
                TOKEN,
                f"{facts.problem}; not needed: the persisted certificate renews itself ({cert.message})",
                **details,
            )
        return fail(TOKEN, f"{facts.problem}, and there is no valid certificate to renew with", facts.hint, **details)
    info = facts.info
    assert info is not None
    expiry = f"expires {ago(info.expires_at, now)}" if info.expires_at else "no expiry"
    ident = ctx.config.identity
    subject = info.subject or ""
    if subject.startswith(_SA_PREFIX):
        namespace, _, account = subject[len(_SA_PREFIX) :].partition(":")
        if (namespace, account) != (ident.namespace, ident.service_account):
            # istiod issues the certificate for the token's account; the agent then ignores it as not its own.
            return warn(
                TOKEN,
                f"the token is for service account {account} in {namespace}, but cluster.env says "
                f"{ident.service_account} in {ident.namespace}",
                "use the token of the WorkloadGroup's service account, or fix SERVICE_ACCOUNT / ISTIO_NAMESPACE",
                **details,
            )
    if not info.audiences:
        return warn(
            TOKEN,
            f"the token names no audience ({expiry}); istiod's CA asks for {ISTIO_CA_AUDIENCE}",
            f"if the CA refuses it, mint one for audience {ISTIO_CA_AUDIENCE}",
            **details,
        )
    return ok(TOKEN, f"audience {ISTIO_CA_AUDIENCE}, {subject or 'no subject'}, {expiry}", **details)


async def check_certificate(ctx: Context) -> CheckResult:
    facts, token = ctx.certificate, ctx.token
    state = facts.state
    details: dict[str, Any] = {
        "state": str(state),
        "path": str(facts.chain_path),
        "spiffe_id": facts.spiffe_id,
        "not_after": facts.not_after.isoformat() if facts.not_after else None,
        "root_checked": facts.root_problem is None
        and state not in (CertState.MISSING, CertState.UNREADABLE, CertState.CORRUPT),
    }
    folder = facts.chain_path.parent
    renew = "the agent asks the CA for a new one with the token" if token.usable else "a new one needs a good token"
    if state is CertState.VALID:
        if facts.root_problem is not None:
            return warn(
                CERTIFICATE,
                f"{facts.message}; not checked against the root: {facts.root_problem}",
                "see the config line for root-cert.pem",
                **details,
            )
        return ok(CERTIFICATE, f"{facts.message}, signed by {ctx.config.paths.root_cert.name}", **details)
    if state is CertState.MISSING:
        if not token.usable:
            return skip(CERTIFICATE, f"not issued yet, and the token it needs is unusable (see {TOKEN})", **details)
        return warn(
            CERTIFICATE,
            f"not issued yet: {renew} when it starts",
            "start the agent (systemctl start vm-agent); the certificate lands in " + str(folder),
            **details,
        )
    if state is CertState.UNTRUSTED:
        return fail(
            CERTIFICATE,
            facts.message,
            f"root-cert.pem and the state folder come from different meshes: install this mesh's root-cert.pem "
            f"(istioctl writes it), or remove {folder / KEY_FILE} and {folder / CHAIN_FILE} so {renew}",
            **details,
        )
    if state is CertState.UNREADABLE:
        return warn(CERTIFICATE, facts.message, "run doctor as root (the files are private to the agent)", **details)
    # Expired, not yet valid, another identity or corrupt: the agent ignores it and asks the CA again; if the
    # token cannot do that either, the token line says so.
    return warn(CERTIFICATE, f"{facts.message}; {renew}", _REMEDY[state], **details)


_REMEDY = {
    CertState.EXPIRED: "nothing to do with a good token; otherwise see the token line",
    CertState.NOT_YET_VALID: "fix the host's clock (timedatectl; chrony or systemd-timesyncd)",
    CertState.OTHER_IDENTITY: "the state folder belonged to another workload: check ISTIO_NAMESPACE, SERVICE_ACCOUNT",
    CertState.CORRUPT: "remove the key and chain in the state folder; the agent requests a new pair",
}
