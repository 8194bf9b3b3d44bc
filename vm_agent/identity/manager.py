"""SecretManager: the one place that holds the workload SVID, renews it and persists it.

Start-up uses a still-valid persisted certificate at once (so Envoy can start before the CA answers),
then renews at ``grace_ratio`` of the lifetime (istio-agent.md §4.5). One loop does every renewal, so
at most one CSR is ever in flight. CA failures are retried forever with a full-jitter exponential backoff
(``vm_agent.backoff``); a change of the token file or root-cert.pem cuts the wait short so an operator's
fix is picked up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vm_agent.backoff import FullJitterBackoff
from vm_agent.identity.ca_client import CaClient, CaError
from vm_agent.identity.keygen import KeygenError, KeyMaker, KeySpec
from vm_agent.identity.settings import IdentitySettings, validate
from vm_agent.identity.store import read_svid_files, write_svid_files
from vm_agent.identity.svid import ChainError, Svid, merge_bundles, rotation_delay, rotation_ratio, spiffe_id
from vm_agent.logs import get_logger
from vm_agent.metrics import REGISTRY, Counter, Gauge
from vm_agent.upstream import describe_token, read_token

log = get_logger("identity")

CERT_EXPIRY = Gauge(
    "vm_agent_identity_cert_expiry_timestamp_seconds",
    "NotAfter of the workload certificate in use (Unix time)",
    registry=REGISTRY,
)
CERT_LAST_ROTATION = Gauge(
    "vm_agent_identity_cert_last_rotation_timestamp_seconds",
    "When the CA last issued us a certificate (Unix time)",
    registry=REGISTRY,
)
ROTATIONS = Counter(
    "vm_agent_identity_rotations",
    "Certificates obtained from the CA",
    registry=REGISTRY,
)
FAILURES = Counter(
    "vm_agent_identity_failures",
    "Failed certificate requests and persistence problems, by reason",
    ["reason"],
    registry=REGISTRY,
)
TOKEN_EXPIRY = Gauge(
    "vm_agent_identity_token_expiry_timestamp_seconds",
    "exp claim of the bearer token file (Unix time; 0 when there is no readable token)",
    registry=REGISTRY,
)

Listener = Callable[[frozenset[str]], None]

DEFAULT = "default"
ROOTCA = "ROOTCA"


def default_backoff() -> FullJitterBackoff:
    """Between failed certificate requests: full jitter from 0.25 s up to a 1 s ceiling doubling to 60 s, so a
    fleet that lost its CA (an istiod restart) does not come back in step."""
    return FullJitterBackoff(1.0, 60.0, floor=0.25)


def _file_signature(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def key_spec(settings: IdentitySettings) -> KeySpec:
    """What every key and CSR of this identity looks like."""
    return KeySpec(
        spiffe_id(settings.trust_domain, settings.namespace, settings.service_account),
        key_algorithm=settings.key_algorithm,
        rsa_key_size=settings.rsa_key_size,
        ec_curve=settings.ec_curve,
        pkcs8=settings.pkcs8,
    )


class SecretManager:
    def __init__(
        self, settings: IdentitySettings, *, backoff: FullJitterBackoff | None = None, keys: KeyMaker | None = None
    ) -> None:
        """``keys``: where keys and CSRs come from (the agent passes one it may already have prefetched)."""
        validate(settings)
        self._settings = settings
        self.ready = asyncio.Event()
        self._svid: Svid | None = None
        self._bundle: bytes = b""
        self._source: str | None = None
        self._rotate_at: datetime | None = None
        self._wake = asyncio.Event()
        self._listeners: list[Listener] = []
        self._backoff = backoff or default_backoff()
        self._rotations = 0
        self._failures = 0
        self._last_rotation: datetime | None = None
        self._last_error: str | None = None
        self._last_error_reason: str | None = None
        self._token_expires_at: datetime | None = None
        self._ca = CaClient(settings.ca, self.client_cert, cert_signer=settings.cert_signer)
        self.expected_id = spiffe_id(settings.trust_domain, settings.namespace, settings.service_account)
        self._keys = keys or KeyMaker(key_spec(settings))

    # -- what others read -------------------------------------------------------------------------

    @property
    def svid(self) -> Svid | None:
        return self._svid

    def trust_bundle(self) -> bytes:
        return self._bundle

    def client_cert(self) -> tuple[bytes, bytes] | None:
        """The current key and chain when the certificate is valid right now (a ``ClientCertProvider``)."""
        svid = self._svid
        if svid is None or not svid.valid_at(datetime.now(UTC)):
            return None
        return svid.key_pem, svid.chain_pem

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with the secret names that changed; returns the unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def request_rotation(self) -> None:
        """Renew now (still one CSR at a time)."""
        self._rotate_at = datetime.now(UTC)
        self._wake.set()

    async def check_ready(self) -> str | None:
        """Readiness seam for the status server: ``None`` when a valid certificate is held, else why not."""
        svid = self._svid
        if svid is None:
            return f"no workload certificate yet: {self._last_error or 'waiting for the CA'}"
        if not svid.valid_at(datetime.now(UTC)):
            return f"workload certificate expired at {svid.not_after.isoformat()}: {self._last_error or 'renewing'}"
        return None

    def snapshot(self) -> dict[str, Any]:
        svid = self._svid
        return {
            "ready": self.ready.is_set(),
            "spiffe_id": svid.spiffe_id if svid else None,
            "expected_spiffe_id": self.expected_id,
            "source": self._source,
            "not_before": _iso(svid.not_before) if svid else None,
            "not_after": _iso(svid.not_after) if svid else None,
            "valid_now": bool(svid and svid.valid_at(datetime.now(UTC))),
            "next_rotation": _iso(self._rotate_at),
            "last_rotation": _iso(self._last_rotation),
            "rotations": self._rotations,
            "failures": self._failures,
            "last_error": self._last_error,
            "last_error_reason": self._last_error_reason,
            "trust_bundle_roots": self._bundle.count(b"-----BEGIN CERTIFICATE-----"),
            "token_expires_at": _iso(self._token_expires_at),
            "state_dir": str(self._settings.state_dir),
        }

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            self._load_persisted()
            while True:
                now = datetime.now(UTC)
                if self._svid is None or (self._rotate_at is not None and now >= self._rotate_at):
                    if await self._try_rotate():
                        self._backoff.reset()
                    else:
                        await self._wait(self._backoff.next(), watch_inputs=True)
                    continue
                assert self._rotate_at is not None
                await self._wait((self._rotate_at - now).total_seconds(), watch_inputs=False)
        finally:
            self._listeners.clear()
            await asyncio.shield(self._keys.aclose())

    async def _wait(self, seconds: float, *, watch_inputs: bool) -> None:
        """Sleep up to ``seconds``; wake early on ``request_rotation`` or, after a failure, on changed inputs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, seconds)
        inputs = (self._settings.ca.token_path, self._settings.ca.root_cert_path)
        before = [_file_signature(p) for p in inputs]
        self._wake.clear()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            # Short slices keep the timer honest when the wall clock jumps (suspend/resume, NTP steps).
            step = min(remaining, 1.0 if watch_inputs else 30.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), step)
            if self._wake.is_set():
                return
            if watch_inputs and [_file_signature(p) for p in inputs] != before:
                log.info("token or root certificate file changed; retrying the CA now")
                return
            if not watch_inputs and self._rotate_at is not None and datetime.now(UTC) >= self._rotate_at:
                return

    def _note_token(self) -> None:
        token = read_token(self._settings.ca)
        expires: datetime | None = None
        if token is not None:
            with contextlib.suppress(ValueError):
                expires = describe_token(token).expires_at
        self._token_expires_at = expires
        TOKEN_EXPIRY.set(expires.timestamp() if expires else 0)

    async def _try_rotate(self) -> bool:
        s = self._settings
        try:
            try:
                key_pem, csr_pem = await self._keys.make()
            except (KeygenError, ValueError) as exc:
                raise CaError("keygen", f"no key and CSR to send: {exc}") from exc
            try:
                chain = await self._ca.create_certificate(csr_pem, s.requested_ttl_seconds)
            finally:
                # The token as the CA call read it: noted before the key was made, a token written meanwhile
                # (the first one, or a kubelet's rotation) got the certificate while the gauge showed the old one.
                self._note_token()
            try:
                svid = Svid.from_ca_response(key_pem, chain)
            except ChainError as exc:
                reason = "empty_chain" if "empty" in str(exc) else "invalid_chain"
                raise CaError(reason, f"CA at {s.ca.address}: {exc}") from exc
        except CaError as exc:
            self._failures += 1
            self._last_error, self._last_error_reason = str(exc), exc.reason
            FAILURES.labels(exc.reason).inc()
            have = "keeping the current certificate" if self.client_cert() else "no valid certificate yet"
            log.warning("certificate request failed (%s): %s; %s, will retry", exc.reason, exc, have)
            return False
        if svid.spiffe_id != self.expected_id:
            # istiod signs the caller's identity, not the CSR's; a mismatch means the token or cert belongs to
            # another workload, which the operator should know about even though the certificate is usable.
            log.warning("CA issued %s but this VM is configured as %s", svid.spiffe_id, self.expected_id)
        self._rotations += 1
        self._last_rotation = svid.created_at
        self._last_error = self._last_error_reason = None
        ROTATIONS.inc()
        CERT_LAST_ROTATION.set(svid.created_at.timestamp())
        self._install(svid, "ca", extra_roots=b"")
        self._persist(svid)
        self._keys.prefetch_soon()  # the next rotation's key, made by the helper while nothing waits for it
        return True

    def _configured_roots(self) -> bytes:
        path = self._settings.ca.root_cert_path
        try:
            return path.read_bytes()
        except OSError as exc:
            log.warning("cannot read root certificate file %s for the trust bundle: %s", path, exc.strerror or exc)
            return b""

    def _install(self, svid: Svid, source: str, *, extra_roots: bytes) -> None:
        bundle = merge_bundles(svid.root_pem, self._configured_roots(), extra_roots)
        changed = {DEFAULT}
        if bundle != self._bundle:
            changed.add(ROOTCA)
        self._svid, self._bundle, self._source = svid, bundle, source
        ratio = rotation_ratio(self._settings.grace_ratio, self._settings.grace_jitter)
        now = datetime.now(UTC)
        self._rotate_at = now + rotation_delay(svid.created_at, svid.not_after, now, ratio)
        CERT_EXPIRY.set(svid.not_after.timestamp())
        log.info(
            "using %s certificate %s valid until %s; next rotation at %s",
            source,
            svid.spiffe_id,
            svid.not_after.isoformat(),
            self._rotate_at.isoformat(timespec="seconds"),
        )
        self.ready.set()
        names = frozenset(changed)
        for listener in list(self._listeners):
            listener(names)

    def _persist(self, svid: Svid) -> None:
        s = self._settings
        # product.md: key and chain are private to the agent (0600) in its state folder, as in OUTPUT_CERTS.
        targets: list[tuple[Path, int]] = [(s.state_dir, 0o600)]
        if s.output_certs is not None:
            targets.append((s.output_certs, 0o600))
        for folder, mode in targets:
            try:
                write_svid_files(folder, svid.key_pem, svid.chain_pem, self._bundle, public_mode=mode)
            except OSError as exc:
                FAILURES.labels("persist").inc()
                log.error("cannot write certificate files to %s: %s", folder, exc.strerror or exc)

    def _load_persisted(self) -> None:
        folder = self._settings.state_dir
        try:
            stored = read_svid_files(folder)
        except OSError as exc:
            log.warning("cannot read persisted certificate in %s: %s", folder, exc.strerror or exc)
            return
        if stored is None:
            log.info("no persisted certificate in %s; asking the CA", folder)
            return
        key_pem, chain_pem, root_pem = stored
        try:
            svid = Svid.from_pems(key_pem, chain_pem)
        except ChainError as exc:
            log.warning("ignoring persisted certificate in %s: %s", folder, exc)
            return
        now = datetime.now(UTC)
        if not svid.valid_at(now):
            log.info("persisted certificate in %s expired at %s; asking the CA", folder, svid.not_after.isoformat())
            return
        if svid.spiffe_id is None or not svid.spiffe_id.endswith(
            f"/ns/{self._settings.namespace}/sa/{self._settings.service_account}"
        ):
            log.warning(
                "ignoring persisted certificate in %s: it is for %s, this VM is %s",
                folder,
                svid.spiffe_id,
                self.expected_id,
            )
            return
        self._install(svid, "persisted", extra_roots=root_pem)
        # The bundle may now include the configured root-cert.pem; keep the stored copy in step.
        self._persist(svid)
