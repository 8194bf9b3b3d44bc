"""What the token and the persisted certificate say about themselves, read once and shared by both checks.

The token check needs to know whether a valid certificate makes the token unnecessary, and the
certificate check whether a good token will replace a missing certificate; neither decides alone.
Nothing here keeps or returns the token text or key material.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from vm_agent.config import Config
from vm_agent.identity.store import CHAIN_FILE, KEY_FILE, read_svid_files
from vm_agent.identity.svid import ChainError, Svid, split_pem_certs
from vm_agent.upstream import ISTIO_CA_AUDIENCE, TokenInfo, describe_token


def token_command(config: Config) -> str:
    """How an operator makes a token the CA accepts, for hints."""
    ident = config.identity
    sa = ident.service_account or "<service-account>"
    return (
        f"`istioctl x workload entry configure` writes one, or `kubectl create token {sa} -n {ident.namespace} "
        f"--audience {ISTIO_CA_AUDIENCE} --duration 1h > {config.paths.token}`"
    )


def ago(moment: datetime, now: datetime) -> str:
    """``in 52m`` / ``3h ago``: the rough distance an operator reads at a glance."""
    seconds = (moment - now).total_seconds()
    span = abs(seconds)
    if span < 120:
        text = f"{span:.0f}s"
    elif span < 7200:
        text = f"{span / 60:.0f}m"
    elif span < 172800:
        text = f"{span / 3600:.0f}h"
    else:
        text = f"{span / 86400:.0f}d"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


@dataclass(frozen=True)
class TokenFacts:
    path: Path
    info: TokenInfo | None
    problem: str | None
    """Why istiod's CA would refuse it; None when it looks usable."""
    hint: str | None

    @property
    def usable(self) -> bool:
        return self.problem is None


def token_facts(config: Config, now: datetime | None = None) -> TokenFacts:
    path = config.paths.token
    now = now or datetime.now(UTC)
    remedy = f"put a fresh token at {path}: {token_command(config)}; the agent re-reads it, no restart needed"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return TokenFacts(path, None, f"no token at {path}", remedy)
    except PermissionError:
        return TokenFacts(
            path,
            None,
            f"cannot read {path}: permission denied",
            "run doctor as root; the agent's user must be able to read it too",
        )
    except (OSError, UnicodeDecodeError) as exc:
        return TokenFacts(path, None, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", remedy)
    if not text:
        return TokenFacts(path, None, f"the token file {path} is empty", remedy)
    try:
        info = describe_token(text)
    except ValueError as exc:  # the message never quotes the token
        return TokenFacts(path, None, f"{path}: {exc}", remedy)
    if info.expires_at is not None and info.expires_at <= now:
        when = f"{info.expires_at.isoformat()} ({ago(info.expires_at, now)})"
        return TokenFacts(path, info, f"the token in {path} expired at {when}", remedy)
    if info.audiences and ISTIO_CA_AUDIENCE not in info.audiences:
        return TokenFacts(
            path,
            info,
            f"the token's audience is {', '.join(info.audiences)}; istiod's CA expects {ISTIO_CA_AUDIENCE}",
            f"mint the token for audience {ISTIO_CA_AUDIENCE}: {token_command(config)}",
        )
    return TokenFacts(path, info, None, None)


class CertState(StrEnum):
    VALID = "valid"
    MISSING = "missing"
    UNREADABLE = "unreadable"
    CORRUPT = "corrupt"
    UNTRUSTED = "untrusted"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    OTHER_IDENTITY = "other_identity"


@dataclass(frozen=True)
class CertificateFacts:
    state: CertState
    message: str
    chain_path: Path
    spiffe_id: str | None = None
    not_after: datetime | None = None
    root_problem: str | None = None
    """Why the chain could not be checked against root-cert.pem (None: it was checked)."""

    @property
    def usable(self) -> bool:
        """What the agent would renew with: valid now, for this VM's identity, and (when checkable) trusted."""
        return self.state is CertState.VALID


def _describe(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string()
    return subject or f"(no subject, serial {cert.serial_number:x})"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_chain(chain_pem: bytes, roots_pem: bytes) -> str | None:
    """None when the chain's leaf leads, through the chain's own intermediates, to a root of ``roots_pem``.

    Signatures and issuer names only: the expiry is judged separately, and the agent's peers (istiod,
    other Envoys) apply their own policy.
    """
    try:
        certs = [x509.load_pem_x509_certificate(b) for b in split_pem_certs(chain_pem)]
        roots = [x509.load_pem_x509_certificate(b) for b in split_pem_certs(roots_pem)]
    except ValueError as exc:
        return f"a certificate does not parse: {exc}"
    if not certs:
        return "the chain holds no certificate"
    if not roots:
        return "root-cert.pem holds no certificate"
    current, pool = certs[0], certs[1:]
    while True:
        if any(_issued_by(current, root) for root in roots):
            return None
        issuer = next((c for c in pool if _issued_by(current, c)), None)
        if issuer is None:
            if any(root.subject == current.issuer for root in roots):
                # Every Istio mesh's self-signed root has the same name; only the key tells them apart.
                return (
                    f"{_describe(current)} was issued by {current.issuer.rfc4514_string()}, and root-cert.pem holds "
                    "a root of that name but with another key (another mesh's root)"
                )
            if current.issuer == current.subject:
                return f"the chain ends at the root {_describe(current)}, which root-cert.pem does not hold"
            return (
                f"{_describe(current)} was issued by {current.issuer.rfc4514_string() or '(no name)'}, "
                "which neither root-cert.pem nor the chain holds"
            )
        pool.remove(issuer)
        current = issuer


def certificate_facts(config: Config, now: datetime | None = None) -> CertificateFacts:
    folder = config.paths.state_dir
    chain_path = folder / CHAIN_FILE
    now = now or datetime.now(UTC)
    try:
        stored = read_svid_files(folder)
    except PermissionError:
        return CertificateFacts(
            CertState.UNREADABLE, f"cannot read {folder / KEY_FILE} or {chain_path}: permission denied", chain_path
        )
    except OSError as exc:
        return CertificateFacts(CertState.UNREADABLE, f"cannot read {chain_path}: {exc.strerror or exc}", chain_path)
    if stored is None:
        return CertificateFacts(CertState.MISSING, f"no certificate in {folder} yet", chain_path)
    key_pem, chain_pem, _ = stored
    try:
        svid = Svid.from_pems(key_pem, chain_pem)
    except ChainError as exc:
        return CertificateFacts(CertState.CORRUPT, f"{chain_path} is unusable: {exc}", chain_path)
    spiffe_id, not_after = svid.spiffe_id, svid.not_after
    root_problem: str | None = None
    try:
        roots = config.paths.root_cert.read_bytes()
    except OSError as exc:
        root_problem = f"cannot read {config.paths.root_cert}: {exc.strerror or exc}"
    else:
        if not split_pem_certs(roots):
            root_problem = f"{config.paths.root_cert} holds no PEM certificate"
        elif (untrusted := verify_chain(chain_pem, roots)) is not None:
            return CertificateFacts(
                CertState.UNTRUSTED,
                f"{chain_path} is not signed by {config.paths.root_cert}: {untrusted}",
                chain_path,
                spiffe_id,
                not_after,
            )

    def facts(state: CertState, message: str) -> CertificateFacts:
        return CertificateFacts(state, message, chain_path, spiffe_id, not_after, root_problem)

    if svid.not_after <= now:
        return facts(CertState.EXPIRED, f"{spiffe_id} expired at {not_after.isoformat()} ({ago(not_after, now)})")
    if svid.not_before > now:
        return facts(
            CertState.NOT_YET_VALID,
            f"{spiffe_id} is valid only from {svid.not_before.isoformat()}: is this host's clock right?",
        )
    ident = config.identity
    if spiffe_id is None or not spiffe_id.endswith(f"/ns/{ident.namespace}/sa/{ident.service_account}"):
        return facts(CertState.OTHER_IDENTITY, f"the certificate is for {spiffe_id}, this VM is {ident.spiffe_id}")
    return facts(CertState.VALID, f"{spiffe_id} valid until {not_after.isoformat()} ({ago(not_after, now)})")
