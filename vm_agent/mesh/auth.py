"""Who is calling: istiod's authenticators in istiod's order — a verified client certificate first,
then a service-account bearer token (with the ``clusterid`` check of the Kubernetes JWT authenticator)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vm_agent.mesh.ca import SpiffeId
from vm_agent.mesh.tokens import ServiceAccountIssuer, TokenError


class AuthError(Exception):
    """Every authenticator refused; the message lists why (never the token)."""


@dataclass(frozen=True)
class Caller:
    identities: tuple[SpiffeId, ...]
    # "client-cert" or "token": which authenticator accepted the caller.
    via: str


def cert_identities(peer_cert: Mapping[str, Any] | None) -> tuple[SpiffeId, ...]:
    """SPIFFE URIs of a peer certificate the TLS layer already verified against the mesh root."""
    if not peer_cert:
        return ()
    ids: list[SpiffeId] = []
    for kind, value in peer_cert.get("subjectAltName", ()):
        if kind == "URI":
            parsed = SpiffeId.parse(value)
            if parsed is not None:
                ids.append(parsed)
    return tuple(ids)


class Authenticator:
    def __init__(
        self,
        issuer: ServiceAccountIssuer,
        *,
        trust_domain: str,
        cluster_id: str,
        audiences: tuple[str, ...],
        service_account_exists: Callable[[str, str], bool],
    ) -> None:
        self._issuer = issuer
        self._trust_domain = trust_domain
        self._cluster_id = cluster_id
        self._audiences = audiences
        self._sa_exists = service_account_exists

    def authenticate(self, peer_cert: Mapping[str, Any] | None, metadata: Mapping[str, str]) -> Caller:
        failures: list[str] = []
        ids = cert_identities(peer_cert)
        if ids:
            return Caller(ids, "client-cert")
        failures.append("client certificate: none presented" if not peer_cert else "client certificate: no SPIFFE URI")
        try:
            return Caller((self._from_token(metadata),), "token")
        except TokenError as e:
            failures.append(f"token: {e}")
        raise AuthError("; ".join(failures))

    def _from_token(self, metadata: Mapping[str, str]) -> SpiffeId:
        header = metadata.get("authorization", "")
        if not header:
            raise TokenError("no authorization header")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError("authorization header is not 'Bearer <token>'")
        cluster = metadata.get("clusterid", "")
        if cluster and cluster != self._cluster_id:
            raise TokenError(f"client claims to be in cluster {cluster!r}, which is not known")
        subject = self._issuer.verify(token.strip(), self._audiences)
        if not self._sa_exists(subject.namespace, subject.service_account):
            raise TokenError(f"service account {subject.namespace}/{subject.service_account} does not exist")
        return SpiffeId(self._trust_domain, subject.namespace, subject.service_account)
