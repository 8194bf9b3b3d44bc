"""How the agent dials istiod: TLS verified against root-cert.pem, server name, client certificate, bearer token.

Both the CA client and the xDS proxy open their connections through ``open_channel`` and attach
``call_metadata`` to every call, so the two upstream paths authenticate the same way istio's agent does:
the token file is re-read on every call and the current workload certificate (if still valid) is presented
as the TLS client certificate, which is what keeps a VM renewable after its bootstrap token expired.

The agent has one gRPC stack, grpclib (HTTP/2 in Python over asyncio's TLS): grpcio's C core would add
~13 MiB to the agent's memory for the same three jobs (bench/results/memory.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase
from grpclib.encoding.proto import ProtoCodec

from vm_agent.logs import get_logger

log = get_logger("upstream")

ClientCertProvider = Callable[[], tuple[bytes, bytes] | None]
"""Returns (key PEM, chain PEM) of the current SVID if it is valid now, else ``None``."""

KEEPALIVE_TIME_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
_WINDOW_BYTES = 4 << 20
# The audience istiod's CA asks the TokenReview for (istiod's TOKEN_AUDIENCES default); istioctl mints the VM's
# token with it.
ISTIO_CA_AUDIENCE = "istio-ca"


@dataclass(frozen=True)
class UpstreamSettings:
    address: str
    """As configured, e.g. ``istiod.istio-system.svc:15012`` (used in messages)."""
    dial_target: str
    """``ip:port`` actually dialed."""
    server_name: str
    """TLS name verified against istiod's serving certificate."""
    root_cert_path: Path
    """PEM bundle that must have signed istiod's serving certificate."""
    token_path: Path | None
    """Bearer token file, re-read on every call."""
    cluster_id: str
    """Sent as metadata ``clusterid``."""
    extra_metadata: tuple[tuple[str, str], ...] = ()
    """XDS_HEADER_* / CA_HEADER_* pairs (keys lower-cased)."""
    plaintext: bool = False
    """CA_ADDR ending in :15010: no TLS at all."""


class UpstreamError(Exception):
    """A problem with the upstream configuration that the operator must fix (message names the file)."""


_warned_lock = threading.Lock()
_warned_token_paths: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    with _warned_lock:
        if key in _warned_token_paths:
            return
        _warned_token_paths.add(key)
    log.warning(message, *args)


def _clear_warning(key: str) -> None:
    with _warned_lock:
        _warned_token_paths.discard(key)


def read_token(settings: UpstreamSettings) -> str | None:
    """The bearer token from ``settings.token_path``, stripped; ``None`` if unset, missing or empty.

    A missing token is not an error: a valid client certificate authenticates on its own. The warning is
    logged once per path until the token shows up again, so a VM running on its certificate for months does
    not flood the journal.
    """
    path = settings.token_path
    if path is None:
        return None
    key = str(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        _warn_once(key, "token file %s does not exist; calling %s without a bearer token", path, settings.address)
        return None
    except (OSError, UnicodeDecodeError) as exc:
        _warn_once(
            key,
            "token file %s is unreadable (%s); calling %s without a bearer token",
            path,
            type(exc).__name__,
            settings.address,
        )
        return None
    if not token:
        _warn_once(key, "token file %s is empty; calling %s without a bearer token", path, settings.address)
        return None
    _clear_warning(key)
    return token


def call_metadata(settings: UpstreamSettings) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for one call: ``authorization`` (if a token exists), ``clusterid``, then the extras."""
    md: list[tuple[str, str]] = []
    token = read_token(settings)
    if token:
        md.append(("authorization", f"Bearer {token}"))
    md.append(("clusterid", settings.cluster_id))
    md.extend((k.lower(), v) for k, v in settings.extra_metadata)
    return tuple(md)


def read_root_certs(settings: UpstreamSettings) -> bytes:
    """The PEM roots that must have signed istiod's serving certificate; ``UpstreamError`` naming the file."""
    path = settings.root_cert_path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UpstreamError(
            f"root certificate file {path} for {settings.address} cannot be read: {exc.strerror or exc}"
        ) from exc
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise UpstreamError(
            f"root certificate file {path} for {settings.address} holds no PEM certificate "
            "(expected one or more '-----BEGIN CERTIFICATE-----' blocks)"
        )
    return data


class RawCodec(CodecBase):
    """Messages as bytes both ways: the xDS proxy relays Envoy's messages without decoding them."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


def split_target(dial_target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ``UpstreamError`` when the port is not a number."""
    host, _, port = dial_target.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise UpstreamError(f"upstream address {dial_target!r} has no numeric port (expected host:port)") from None


def _load_client_certificate(ctx: ssl.SSLContext, key_pem: bytes, chain_pem: bytes) -> None:
    """Present (key, chain) as the TLS client certificate without writing the key to any file system path.

    Python's ssl loads certificates only from files, so the PEM goes to an anonymous memory file that
    this process alone can open (by its /proc/self/fd path) and that vanishes when closed.
    """
    fd = os.memfd_create("vm-agent-client-certificate", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as out:
            out.write(chain_pem.rstrip(b"\n") + b"\n" + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def tls_context(settings: UpstreamSettings, client_cert: ClientCertProvider | None) -> ssl.SSLContext:
    """TLS 1.2+ with HTTP/2's ALPN, istiod verified against root-cert.pem (under ``server_name``, see
    ``open_channel``); the current workload certificate, if any, as client certificate."""
    roots = read_root_certs(settings)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_verify_locations(cadata=roots.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise UpstreamError(
            f"root certificate file {settings.root_cert_path} for {settings.address} does not load: {exc.reason or exc}"
        ) from exc
    pair = client_cert() if client_cert is not None else None
    if pair is not None:
        _load_client_certificate(ctx, *pair)
    return ctx


class _UpstreamChannel(Channel):
    def __init__(self, settings: UpstreamSettings, tls: ssl.SSLContext | None, codec: CodecBase | None) -> None:
        host, port = split_target(settings.dial_target)
        config = Configuration(
            _keepalive_time=KEEPALIVE_TIME_S,
            _keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            _keepalive_permit_without_calls=True,
            http2_connection_window_size=_WINDOW_BYTES,
            http2_stream_window_size=_WINDOW_BYTES,
            ssl_target_name_override=settings.server_name if tls is not None else None,
        )
        super().__init__(host, port, ssl=tls, codec=codec or ProtoCodec(), config=config)
        if tls is not None:
            # :authority names istiod as its certificate does, not the address we happen to dial.
            self._authority = settings.server_name

    async def __connect__(self) -> Any:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await super().__connect__()
        except TimeoutError:
            raise ConnectionError(f"no connection within {CONNECT_TIMEOUT_S:g}s") from None


def open_channel(
    settings: UpstreamSettings, client_cert: ClientCertProvider | None, *, codec: CodecBase | None = None
) -> Channel:
    """A fresh grpclib channel to ``settings.dial_target`` (it connects on the first call).

    TLS verifies istiod against ``root_cert_path`` under ``server_name``; the client certificate is taken
    from ``client_cert()`` now, so callers open a new channel per connection attempt to pick up a rotated
    certificate and re-read roots. ``codec`` defaults to protobuf messages (``RawCodec`` relays bytes).
    Raises ``UpstreamError`` when root-cert.pem is unusable, ``ssl.SSLError`` when the client
    certificate is.
    """
    tls = None if settings.plaintext else tls_context(settings, client_cert)
    return _UpstreamChannel(settings, tls, codec)


UNAVAILABLE_ERRORS = (OSError, ssl.SSLError, asyncio.IncompleteReadError)
"""What a failed connection to istiod raises (grpcio folded these into UNAVAILABLE)."""


@dataclass(frozen=True)
class TokenInfo:
    subject: str | None
    audiences: tuple[str, ...]
    expires_at: datetime | None
    issued_at: datetime | None

    def expired(self, now: datetime | None = None) -> bool:
        if self.expires_at is None:
            return False
        return self.expires_at <= (now or datetime.now(UTC))


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _timestamp(value: object, claim: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"JWT claim {claim!r} is {type(value).__name__}, expected a number of seconds since 1970")
    return datetime.fromtimestamp(value, UTC)


def describe_token(token: str) -> TokenInfo:
    """What the token claims (subject, audiences, expiry), decoded WITHOUT verifying its signature.

    Only for operator messages ("token expired at T", "audience is X not istio-ca"); istiod is the one
    that verifies. ``ValueError`` (never quoting the token) if it is not a JWT.
    """
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise ValueError(f"token is not a JWT: expected 3 dot-separated parts, found {len(parts)}")
    try:
        payload = json.loads(_b64url(parts[1]))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError("token is not a JWT: its payload is not base64url-encoded JSON") from exc
    if not isinstance(payload, dict):
        raise ValueError("token is not a JWT: its payload is not a JSON object")
    aud = payload.get("aud")
    audiences: tuple[str, ...]
    if aud is None:
        audiences = ()
    elif isinstance(aud, str):
        audiences = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        audiences = tuple(aud)
    else:
        raise ValueError("JWT claim 'aud' must be a string or a list of strings")
    sub = payload.get("sub")
    return TokenInfo(
        subject=sub if isinstance(sub, str) else None,
        audiences=audiences,
        expires_at=_timestamp(payload.get("exp"), "exp"),
        issued_at=_timestamp(payload.get("iat"), "iat"),
    )


# X509_V_ERR_HOSTNAME_MISMATCH / X509_V_ERR_IP_ADDRESS_MISMATCH: the name, not the signer, is wrong.
_NAME_MISMATCH_CODES = {62, 64}


async def diagnose_connection(settings: UpstreamSettings, connect_timeout: float = 5.0) -> str | None:
    """Why istiod cannot be reached, in operator terms; ``None`` when TCP and TLS both succeed.

    gRPC folds every connection problem into UNAVAILABLE; a plain TCP connect and TLS handshake with the
    same roots and name tell "unreachable" apart from "not signed by root-cert.pem" and "wrong name".
    """
    host, _, port_text = settings.dial_target.rpartition(":")
    host = host.strip("[]")
    where = (
        f"{settings.address} ({settings.dial_target})" if settings.address != settings.dial_target else settings.address
    )
    try:
        port = int(port_text)
    except ValueError:
        return f"CA/istiod address {settings.dial_target!r} has no numeric port (expected host:port)"
    ctx: ssl.SSLContext | None = None
    if not settings.plaintext:
        try:
            roots = read_root_certs(settings)
        except UpstreamError as exc:
            return str(exc)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["h2"])
        try:
            ctx.load_verify_locations(cadata=roots.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            return f"root certificate file {settings.root_cert_path} does not load: {exc.reason or exc}"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=settings.server_name if ctx else None),
            connect_timeout,
        )
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in _NAME_MISMATCH_CODES:
            return (
                f"istiod certificate at {where} is not valid for the name {settings.server_name!r} "
                f"({exc.verify_message}); check the host in the CA/discovery address or ISTIOD_SAN"
            )
        return (
            f"istiod certificate at {where} is not signed by {settings.root_cert_path} ({exc.verify_message}); "
            "root-cert.pem does not belong to this mesh"
        )
    except ssl.SSLError as exc:
        return f"TLS handshake with {where} failed: {exc.reason or exc}"
    except TimeoutError:
        return f"CA unreachable at {where}: no answer within {connect_timeout:g}s"
    except OSError as exc:
        return f"CA unreachable at {where}: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    del reader
    return None
