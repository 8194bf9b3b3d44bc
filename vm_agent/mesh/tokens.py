"""Service-account tokens: RS256 JWTs shaped like Kubernetes bound tokens, signed by the mesh's own
issuer key (kept in the state folder) and checked the way a TokenReview would check them."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vm_agent.mesh.ca import _write_private

ISSUER = "https://kubernetes.default.svc.cluster.local"
SIGNER_KEY_FILE = "sa-signer-key.pem"
SA_PREFIX = "system:serviceaccount:"


class TokenError(Exception):
    """Why a bearer token is not accepted (never contains the token)."""


@dataclass(frozen=True)
class TokenSubject:
    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as e:
        raise TokenError(f"token {what} is not base64url") from e


class ServiceAccountIssuer:
    def __init__(self, state_dir: Path) -> None:
        path = state_dir / SIGNER_KEY_FILE
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError(f"{path}: expected an RSA private key for RS256 tokens")
            self._key = key
        else:
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_private(
                path,
                self._key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
            )
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._kid = _b64(hashlib.sha256(der).digest())

    def mint(
        self,
        namespace: str,
        service_account: str,
        audiences: tuple[str, ...] = ("istio-ca",),
        ttl_seconds: int = 3600,
        not_before: int | None = None,
        *,
        now: int | None = None,
    ) -> str:
        issued = int(time.time()) if now is None else now
        claims: dict[str, Any] = {
            "aud": list(audiences),
            "exp": issued + ttl_seconds,
            "iat": issued,
            "iss": ISSUER,
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
            },
            "nbf": issued if not_before is None else not_before,
            "sub": f"{SA_PREFIX}{namespace}:{service_account}",
        }
        header = {"alg": "RS256", "kid": self._kid}
        signing_input = (
            _b64(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64(json.dumps(claims, separators=(",", ":")).encode())
        )
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64(sig)

    def verify(self, token: str, audiences: tuple[str, ...], *, now: float | None = None) -> TokenSubject:
        """Signature, audience, expiry, not-before and subject shape; the caller checks the account exists."""
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("token is not a JWT (expected three dot-separated parts)")
        try:
            header = json.loads(_unb64(parts[0], "header"))
            claims = json.loads(_unb64(parts[1], "payload"))
        except json.JSONDecodeError as e:
            raise TokenError("token header or payload is not JSON") from e
        if not isinstance(header, dict) or header.get("alg") != "RS256":
            raise TokenError("token: alg must be RS256")
        try:
            self._key.public_key().verify(
                _unb64(parts[2], "signature"),
                f"{parts[0]}.{parts[1]}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature as e:
            raise TokenError("token signature is not from this mesh's service-account issuer") from e
        if not isinstance(claims, dict):
            raise TokenError("token payload is not an object")
        t = time.time() if now is None else now
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int) or t >= exp:
            raise TokenError("token has expired")
        if isinstance(nbf, int) and t < nbf:
            raise TokenError("token is not valid yet (nbf in the future)")
        aud = claims.get("aud")
        token_auds = (aud,) if isinstance(aud, str) else tuple(a for a in (aud or []) if isinstance(a, str))
        if not set(token_auds) & set(audiences):
            raise TokenError(f"token audiences {list(token_auds)} do not include any of {list(audiences)}")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.startswith(SA_PREFIX) or sub.count(":") != 3:
            raise TokenError("token subject is not system:serviceaccount:<namespace>:<name>")
        _, _, ns, sa = sub.split(":")
        if not ns or not sa:
            raise TokenError("token subject is not system:serviceaccount:<namespace>:<name>")
        return TokenSubject(ns, sa, token_auds, exp)
