"""Client for istiod's ``IstioCertificateService.CreateCertificate`` (istio-agent.md §4.4).

Each attempt dials a fresh channel, so a rotated client certificate, a new token and new roots are
always used. Failures come back as ``CaError`` with a short ``reason`` (a metric label) and a message an
operator can act on: which file, which address, what the token says about itself.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf import struct_pb2
from grpclib.client import UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from vm_agent.backoff import FullJitterBackoff
from vm_agent.logs import get_logger
from vm_agent.proto import CA_CREATE_CERTIFICATE_PATH, ca_pb2
from vm_agent.upstream import (
    ISTIO_CA_AUDIENCE,
    UNAVAILABLE_ERRORS,
    ClientCertProvider,
    UpstreamError,
    UpstreamSettings,
    call_metadata,
    describe_token,
    diagnose_connection,
    open_channel,
    read_token,
)

log = get_logger("identity")

# istio's CA client retries these codes inside one CreateCertificate call (§4.4, §18 P2).
RETRYABLE_CODES = frozenset(
    {
        Status.CANCELLED,
        Status.DEADLINE_EXCEEDED,
        Status.RESOURCE_EXHAUSTED,
        Status.ABORTED,
        Status.INTERNAL,
        Status.UNAVAILABLE,
    }
)
ATTEMPTS = 5
FIRST_WAIT = 0.1


class RpcError(Exception):
    """One failed CreateCertificate call: the gRPC status (a failed connection is UNAVAILABLE) and details."""

    def __init__(self, status: Status, details: str) -> None:
        super().__init__(f"{status.name}: {details}")
        self.status = status
        self.details = details


class CaError(Exception):
    """A failed certificate request: ``reason`` is a stable label, ``str()`` the operator message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _token_problem(settings: UpstreamSettings, now: datetime) -> tuple[str, str] | None:
    """What is wrong with the bearer token, judged from its own claims (not verified; istiod verifies)."""
    token = read_token(settings)
    if token is None:
        return ("no_credentials", f"no token in {settings.token_path} and no valid certificate to renew with")
    try:
        info = describe_token(token)
    except ValueError as exc:
        return ("token_invalid", f"token in {settings.token_path} is unusable: {exc}")
    if info.expires_at is not None and info.expires_at <= now:
        return (
            "token_expired",
            f"token in {settings.token_path} expired at {info.expires_at.isoformat()}; "
            "put a fresh token there (it is read on every attempt, no restart needed)",
        )
    if info.audiences and ISTIO_CA_AUDIENCE not in info.audiences:
        return (
            "token_audience",
            f"token in {settings.token_path} has audience {', '.join(info.audiences)}, not {ISTIO_CA_AUDIENCE}",
        )
    return None


class CaClient:
    def __init__(
        self,
        settings: UpstreamSettings,
        client_cert: ClientCertProvider | None,
        *,
        cert_signer: str = "",
        call_timeout: float = 10.0,
        attempts: int = ATTEMPTS,
        first_wait: float = FIRST_WAIT,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._client_cert = client_cert
        self._cert_signer = cert_signer
        self._call_timeout = call_timeout
        self._attempts = attempts
        self._first_wait = first_wait
        self._rng = rng or random.Random()

    async def _attempt(self, request: ca_pb2.IstioCertificateRequest) -> ca_pb2.IstioCertificateResponse:
        try:
            channel = open_channel(self._settings, self._client_cert)
        except ssl.SSLError as exc:
            raise RpcError(Status.UNAVAILABLE, f"the current certificate cannot be presented: {exc}") from exc
        try:
            create: UnaryUnaryMethod[ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse] = (
                UnaryUnaryMethod(
                    channel, CA_CREATE_CERTIFICATE_PATH, ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse
                )
            )
            response: ca_pb2.IstioCertificateResponse = await create(
                request, metadata=call_metadata(self._settings), timeout=self._call_timeout
            )
            return response
        except GRPCError as exc:
            raise RpcError(exc.status, exc.message or "") from exc
        except TimeoutError as exc:
            raise RpcError(Status.DEADLINE_EXCEEDED, f"no answer within {self._call_timeout:g}s") from exc
        except (*UNAVAILABLE_ERRORS, StreamTerminatedError, ProtocolError) as exc:
            raise RpcError(Status.UNAVAILABLE, f"{type(exc).__name__}: {exc}") from exc
        finally:
            channel.close()

    async def create_certificate(self, csr_pem: bytes, validity_seconds: int) -> Sequence[str]:
        """The CA's ``cert_chain`` for ``csr_pem``; ``CaError`` after the retries are used up."""
        metadata = struct_pb2.Struct()
        metadata.update({"CertSigner": self._cert_signer})
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode("ascii"), validity_duration=validity_seconds, metadata=metadata
        )
        last: RpcError | None = None
        # Full jitter (vm_agent.backoff) so that CA clients failing together do not retry together.
        backoff = FullJitterBackoff(
            self._first_wait, self._first_wait * 2**self._attempts, floor=self._first_wait / 2, rng=self._rng
        )
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(backoff.next())
            try:
                response = await self._attempt(request)
            except UpstreamError as exc:
                raise CaError("root_cert", str(exc)) from exc
            except RpcError as exc:
                last = exc
                if exc.status not in RETRYABLE_CODES:
                    break
                continue
            return list(response.cert_chain)
        assert last is not None
        raise await self._explain(last)

    async def _explain(self, exc: RpcError) -> CaError:
        code = exc.status
        details = exc.details
        where = self._settings.address
        if code in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED):
            problem = await diagnose_connection(self._settings)
            if problem is not None:
                if "not signed by" in problem:
                    return CaError("tls_untrusted", problem)
                if "not valid for the name" in problem:
                    return CaError("tls_name", problem)
                if problem.startswith("CA unreachable"):
                    return CaError("ca_unreachable", problem)
                return CaError("tls", problem)
            return CaError("ca_unavailable", f"CA at {where} is reachable but answered {code.name}: {details}")
        if code in (Status.UNAUTHENTICATED, Status.PERMISSION_DENIED):
            has_cert = self._client_cert is not None and self._client_cert() is not None
            token_problem = None if has_cert else _token_problem(self._settings, datetime.now(UTC))
            if token_problem is not None:
                reason, message = token_problem
                return CaError(reason, f"CA at {where} refused us ({code.name}): {message}")
            what = "our certificate" if has_cert else f"the token in {self._settings.token_path}"
            return CaError("unauthenticated", f"CA at {where} refused {what} ({code.name}): {details}")
        return CaError("ca_rejected", f"CA at {where} failed the request ({code.name}): {details}")
