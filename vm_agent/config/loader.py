"""Build the agent's ``Config`` from istioctl's VM files, the environment and resolv.conf.

The derivations follow Istio's ``istio-start.sh`` and ``pilot-agent`` (reference sections 1-3 and 6) so that istiod
cannot tell us from pilot-agent. Every problem is collected (file, line, key, expected, found); nothing
stops at the first one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vm_agent.config import shellenv
from vm_agent.config.agent_knobs import heartbeat_problem, proxy_log_level
from vm_agent.config.envreader import EnvReader
from vm_agent.config.formats import (
    check_pem_certificates,
    is_ip,
    parse_duration,
    parse_hosts,
    parse_resolv_conf,
)
from vm_agent.config.model import (
    AgentConfig,
    CaptureConfig,
    Config,
    DnsConfig,
    IdentityConfig,
    Paths,
    ProxyConfig,
    Upstream,
)
from vm_agent.config.node import build_node
from vm_agent.config.probe import ReadinessProbe, parse_probe
from vm_agent.config.problems import ConfigError, Problem
from vm_agent.config.role import check_gateway, read_role
from vm_agent.interfaces import scan_interface_ips as _scan_interface_ips

DEFAULT_ISTIOD_HOST = "istiod.istio-system.svc"

# istioctl's output names (for --config-dir) and the VM guide's install locations (relative to --root).
ISTIOCTL_FILES = {
    "cluster_env": "cluster.env",
    "mesh_config": "mesh.yaml",
    "hosts": "hosts",
    "root_cert": "root-cert.pem",
    "token": "istio-token",
}
VM_PATHS = {
    "cluster_env": "var/lib/istio/envoy/cluster.env",
    "sidecar_env": "var/lib/istio/envoy/sidecar.env",
    "mesh_config": "etc/istio/config/mesh",
    "root_cert": "etc/certs/root-cert.pem",
    "token": "var/run/secrets/tokens/istio-token",
    "hosts": "etc/hosts",
    "resolv_conf": "etc/resolv.conf",
    "state_dir": "var/lib/vm-agent",
    "sds_socket": "var/run/secrets/workload-spiffe-uds/socket",
}

PROXY_CONFIG_DEFAULTS: dict[str, Any] = {
    "configPath": "./etc/istio/proxy",
    "binaryPath": "/usr/local/bin/envoy",
    "serviceCluster": "istio-proxy",
    "drainDuration": "45s",
    "terminationDrainDuration": "5s",
    "proxyAdminPort": 15000,
    "controlPlaneAuthPolicy": "MUTUAL_TLS",
    "discoveryAddress": f"{DEFAULT_ISTIOD_HOST}:15012",
    "statNameLength": 189,
    "statusPort": 15020,
}


@dataclass(frozen=True)
class Options:
    """What the command line can say about where the inputs are."""

    root: Path = Path("/")
    config_dir: Path | None = None  # a folder with istioctl's five files under their istioctl names
    state_dir: Path | None = None
    resolv_conf: Path | None = None
    environ: Mapping[str, str] | None = None  # None: os.environ
    scan_interfaces: bool = True
    hostname: str | None = None  # None: this machine's short host name
    extra_env: Mapping[str, str] = field(default_factory=dict)  # --set KEY=VALUE, wins over everything


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, file: Path | str, key: str, message: str, line: int | None = None) -> None:
        self.problems.append(Problem(str(file), key, message, line))


def _resolve_path(root: Path, value: str) -> Path:
    """Istio's built-in paths are relative to the working directory, which is / on a VM (§ conventions).

    Under ``--root`` both relative (``./etc/certs``) and absolute paths land inside the root.
    """
    stripped = value[2:] if value.startswith("./") else value
    return root / stripped.lstrip("/")


def _read_text(path: Path, what: str, errs: _Collector, *, required: bool = True) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            errs.add(path, "", f"{what} not found: expected the file istioctl wrote here")
        return None
    except IsADirectoryError:
        errs.add(path, "", f"{what}: expected a file, found a directory")
    except PermissionError:
        errs.add(path, "", f"{what}: permission denied (the agent's user must be able to read it)")
    except UnicodeDecodeError as err:
        errs.add(path, "", f"{what}: expected UTF-8 text ({err.reason} at byte {err.start})")
    except OSError as err:
        errs.add(path, "", f"{what}: cannot read: {err.strerror}")
    return None


# ---- YAML with line numbers ----------------------------------------------------------------------


def _yaml_with_lines(text: str, path: Path, errs: _Collector) -> tuple[Any, dict[str, int]]:
    """Load YAML and remember the line of every mapping key path (``a.b.c``)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", None) or str(err)
        errs.add(path, "", f"expected valid YAML: {problem}", line)
        return None, {}
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                key = f"{prefix}[{i}]"
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    if node is not None:
        walk(node, "")
    return data, lines


def _line_of(lines: Mapping[str, int], key: str) -> int | None:
    probe = key
    while probe:
        if probe in lines:
            return lines[probe]
        cut = max(probe.rfind("."), probe.rfind("["))
        if cut <= 0:
            break
        probe = probe[:cut]
    return lines.get(probe)


# ---- ProxyConfig ---------------------------------------------------------------------------------


def _merge_proxy_config(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Istio's "merge by replacement": scalars and lists overwrite, proxyMetadata merges key-wise."""
    out = dict(base)
    for key, value in overlay.items():
        if key == "proxyMetadata" and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            merged = dict(out[key])
            merged.update(value)
            out[key] = merged
        else:
            out[key] = value
    return out


def _proxy_config(
    raw: dict[str, Any], report: Callable[[str, str], None], probe_report: Callable[[str, str], None]
) -> ProxyConfig:
    def dur(key: str) -> float:
        value = raw.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, str):
            report(key, f"expected a duration like 10s or 1m30s, got {value!r}")
            return parse_duration(str(PROXY_CONFIG_DEFAULTS[key]))
        try:
            seconds = parse_duration(value)
        except ValueError as err:
            report(key, str(err))
            return parse_duration(str(PROXY_CONFIG_DEFAULTS[key]))
        if seconds < 0:
            report(key, f"expected a positive duration, got {value!r}")
        return seconds

    def port(key: str) -> int:
        value = raw.get(key)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            report(key, f"expected 1-65535, got {value!r}")
            return int(PROXY_CONFIG_DEFAULTS[key])
        return value

    def text(key: str, default: str = "") -> str:
        value = raw.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            report(key, f"expected a string, got {value!r}")
            return default
        return value

    metadata_raw = raw.get("proxyMetadata") or {}
    metadata: dict[str, str] = {}
    if not isinstance(metadata_raw, Mapping):
        report("proxyMetadata", f"expected a mapping of strings, got {metadata_raw!r}")
    else:
        for k, v in metadata_raw.items():
            if isinstance(v, str):
                metadata[str(k)] = v
            elif isinstance(v, bool | int | float):
                metadata[str(k)] = json.dumps(v) if not isinstance(v, bool) else str(v).lower()
            elif v is None:
                metadata[str(k)] = ""
            else:
                report(f"proxyMetadata.{k}", f"expected a string, got {v!r}")

    runtime_raw = raw.get("runtimeValues") or {}
    runtime: dict[str, str] = {}
    if isinstance(runtime_raw, Mapping):
        runtime = {str(k): str(v) for k, v in runtime_raw.items()}
    else:
        report("runtimeValues", f"expected a mapping, got {runtime_raw!r}")

    concurrency_raw = raw.get("concurrency")
    concurrency: int | None = None
    if concurrency_raw is not None:
        if isinstance(concurrency_raw, bool) or not isinstance(concurrency_raw, int) or concurrency_raw < 0:
            report("concurrency", f"expected a non-negative integer, got {concurrency_raw!r}")
        else:
            concurrency = concurrency_raw or None

    stat_len = raw.get("statNameLength", 189)
    if isinstance(stat_len, bool) or not isinstance(stat_len, int) or stat_len <= 0:
        report("statNameLength", f"expected a positive integer, got {stat_len!r}")
        stat_len = 189

    discovery = text("discoveryAddress", PROXY_CONFIG_DEFAULTS["discoveryAddress"])
    if _split_host_port(discovery) is None:
        report("discoveryAddress", f"expected host:port, got {discovery!r}")
        discovery = PROXY_CONFIG_DEFAULTS["discoveryAddress"]

    interception = text("interceptionMode", "REDIRECT").upper() or "REDIRECT"
    if interception not in ("REDIRECT", "TPROXY", "NONE"):
        report("interceptionMode", f"expected REDIRECT, TPROXY or NONE, got {interception!r}")
        interception = "REDIRECT"

    probe: ReadinessProbe | None = None
    if raw.get("readinessProbe") is not None:
        probe = parse_probe(raw["readinessProbe"], "readinessProbe", probe_report)

    policy = text("controlPlaneAuthPolicy", "MUTUAL_TLS").upper()
    if policy not in ("MUTUAL_TLS", "NONE", "INHERIT"):
        report("controlPlaneAuthPolicy", f"expected MUTUAL_TLS or NONE, got {policy!r}")

    return ProxyConfig(
        raw=raw,
        config_path=text("configPath", PROXY_CONFIG_DEFAULTS["configPath"]) or PROXY_CONFIG_DEFAULTS["configPath"],
        binary_path=text("binaryPath", PROXY_CONFIG_DEFAULTS["binaryPath"]),
        service_cluster=text("serviceCluster", "istio-proxy"),
        drain_duration_s=dur("drainDuration"),
        termination_drain_duration_s=dur("terminationDrainDuration"),
        discovery_address=discovery,
        proxy_admin_port=port("proxyAdminPort"),
        status_port=port("statusPort"),
        control_plane_auth_policy=policy,
        interception_mode=interception,
        concurrency=concurrency,
        stat_name_length=int(stat_len),
        proxy_metadata=metadata,
        runtime_values=runtime,
        readiness_probe=probe,
    )


# ---- addresses -------------------------------------------------------------------------------------


def _split_host_port(address: str) -> tuple[str, int] | None:
    address = address.strip()
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or ":" in host:
            return None
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None
    return host, int(port_text)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tls_server_name(host: str, override: str) -> str:
    """§4.2: the dialed host, ``localhost`` replaced by istiod's name, an explicit SAN override winning."""
    if override:
        return override
    if "localhost" in host:
        return DEFAULT_ISTIOD_HOST
    return host


# ---- the loader -------------------------------------------------------------------------------------


def load(options: Options | None = None, *, strict: bool = False) -> Config:
    """Read every input and derive the effective configuration.

    Problems are collected in ``Config.problems``; with ``strict=True`` a ``ConfigError`` carrying all of them
    is raised instead.
    """
    opts = options or Options()
    errs = _Collector()
    root = opts.root
    environ = dict(os.environ if opts.environ is None else opts.environ)

    if opts.config_dir is not None:
        cd = opts.config_dir
        files = {k: cd / v for k, v in ISTIOCTL_FILES.items()}
        if not cd.is_dir():
            errs.add(cd, "", "--config-dir: expected a folder holding istioctl's files")
    else:
        files = {k: root / VM_PATHS[k] for k in ISTIOCTL_FILES}
    sidecar_env_path = root / VM_PATHS["sidecar_env"]

    # 1. cluster.env (and sidecar.env) as istio-start.sh sources them; the process environment overrides.
    file_env: dict[str, str] = {}
    env_lines: dict[str, tuple[Path, int]] = {}
    for path, required in ((sidecar_env_path, False), (files["cluster_env"], True)):
        text = _read_text(path, "cluster.env" if required else "sidecar.env", errs, required=required)
        if text is None:
            continue
        assignments, syntax_errors = shellenv.parse(text, {**environ, **file_env})
        for se in syntax_errors:
            errs.add(path, "", se.message, se.line)
        for a in assignments:
            file_env[a.key] = a.value
            env_lines[a.key] = (path, a.line)
    env: dict[str, str] = {**file_env, **environ, **opts.extra_env}
    envr = EnvReader(env, environ=environ, extra=opts.extra_env, lines=env_lines, report=errs.add)
    env_problem, env_bool, env_duration = envr.problem, envr.bool, envr.duration
    role = read_role(envr)

    # 2. istio-start.sh derivations (§13.3).
    namespace = env.get("ISTIO_NAMESPACE") or "default"
    service = env.get("ISTIO_SERVICE") or "rawvm"
    system_namespace = env.get("ISTIO_SYSTEM_NAMESPACE") or "istio-system"
    pilot_address = env.get("PILOT_ADDRESS", "")
    pilot_port = env.get("ISTIO_PILOT_PORT", "")
    if env.get("CA_ADDR"):
        ca_addr = env["CA_ADDR"]
    elif pilot_address:
        ca_addr = pilot_address
    elif pilot_port:
        ca_addr = f"istiod.{system_namespace}.svc:{pilot_port}"
    else:
        ca_addr = f"istiod.{system_namespace}.svc:15012"
    proxy_config_env = env.get("PROXY_CONFIG", "")
    custom_pilot = pilot_address or (f"istiod.{system_namespace}.svc:{pilot_port}" if pilot_port else "")
    if custom_pilot:
        proxy_config_env = f"{proxy_config_env}\ndiscoveryAddress: {custom_pilot}\n"
    if not proxy_config_env:
        policy = env.get("ISTIO_CP_AUTH") or "MUTUAL_TLS"
        proxy_config_env = f"serviceCluster: {service}\ncontrolPlaneAuthPolicy: {policy}\n"
    pod_name = env.get("POD_NAME") or opts.hostname or socket.gethostname().split(".", 1)[0]

    # 3. ProxyConfig: defaults < mesh file defaultConfig < PROXY_CONFIG (§3).
    raw_pc: dict[str, Any] = dict(PROXY_CONFIG_DEFAULTS)
    mesh_path = files["mesh_config"]
    mesh_text = _read_text(mesh_path, "mesh config", errs)
    mesh_doc: Any = None
    mesh_lines: dict[str, int] = {}
    if mesh_text is not None:
        mesh_doc, mesh_lines = _yaml_with_lines(mesh_text, mesh_path, errs)
        if mesh_doc is None and mesh_text.strip() and not any(p.file == str(mesh_path) for p in errs.problems):
            errs.add(mesh_path, "", "expected a MeshConfig mapping")
        elif mesh_doc is not None and not isinstance(mesh_doc, Mapping):
            errs.add(mesh_path, "", f"expected a MeshConfig mapping, got {type(mesh_doc).__name__}")
            mesh_doc = None
    mesh_default: Any = (mesh_doc or {}).get("defaultConfig") if isinstance(mesh_doc, Mapping) else None
    if mesh_default is not None and not isinstance(mesh_default, Mapping):
        errs.add(mesh_path, "defaultConfig", "expected a ProxyConfig mapping", _line_of(mesh_lines, "defaultConfig"))
        mesh_default = None
    pc_env_doc: Any = None
    pc_env_lines: dict[str, int] = {}
    if proxy_config_env.strip():
        pc_env_doc, pc_env_lines = _yaml_with_lines(proxy_config_env, Path("PROXY_CONFIG"), errs)
        if pc_env_doc is not None and not isinstance(pc_env_doc, Mapping):
            errs.add("PROXY_CONFIG", "", f"expected a ProxyConfig mapping, got {type(pc_env_doc).__name__}")
            pc_env_doc = None
    # Each key is reported against the layer it came from.
    origin: dict[str, str] = {}
    if isinstance(mesh_default, Mapping):
        raw_pc = _merge_proxy_config(raw_pc, mesh_default)
        origin.update(dict.fromkeys(mesh_default, "mesh"))
    if isinstance(pc_env_doc, Mapping):
        raw_pc = _merge_proxy_config(raw_pc, pc_env_doc)
        origin.update(dict.fromkeys(pc_env_doc, "env"))

    def pc_report(key: str, message: str) -> None:
        top = key.split(".", 1)[0].split("[", 1)[0]
        if origin.get(top) == "env":
            errs.add("PROXY_CONFIG", key, message, _line_of(pc_env_lines, key))
        else:
            mesh_key = f"defaultConfig.{key}"
            errs.add(mesh_path, mesh_key, message, _line_of(mesh_lines, mesh_key))

    proxy = _proxy_config(raw_pc, pc_report, pc_report)
    if role == "gateway":
        check_gateway(envr, proxy, interception_set="interceptionMode" in origin, report_proxy_config=pc_report)

    # 4. Identity.
    service_account = env.get("SERVICE_ACCOUNT", "")
    if not service_account:
        env_problem("SERVICE_ACCOUNT", "expected the workload's service account name, got nothing")
    trust_domain = env.get("TRUST_DOMAIN", "")
    if not trust_domain:
        mesh_td = mesh_doc.get("trustDomain") if isinstance(mesh_doc, Mapping) else None
        # istioctl writes TRUST_DOMAIN='' when the mesh does not spell it out; the mesh default applies then.
        # (istiod ignores the CSR SAN, so this only changes what we display and request.)
        trust_domain = mesh_td if isinstance(mesh_td, str) and mesh_td else "cluster.local"
    cluster_id = env.get("ISTIO_META_CLUSTER_ID", "")
    key_algorithm = "ECDSA" if env.get("ECC_SIGNATURE_ALGORITHM", "").upper() == "ECDSA" else "RSA"
    rsa_bits_text = env.get("WORKLOAD_RSA_KEY_SIZE", "2048")
    rsa_bits = 2048
    if not rsa_bits_text.isdigit() or int(rsa_bits_text) < 2048:
        env_problem("WORKLOAD_RSA_KEY_SIZE", f"expected an RSA key size of at least 2048, got {rsa_bits_text!r}")
    else:
        rsa_bits = int(rsa_bits_text)
    curve = (env.get("ECC_CURVE") or "P256").upper()
    if curve not in ("P256", "P384"):
        env_problem("ECC_CURVE", f"expected P256 or P384, got {curve!r}")
        curve = "P256"

    identity = IdentityConfig(
        trust_domain=trust_domain,
        namespace=namespace,
        service_account=service_account,
        cluster_id=cluster_id,
        key_algorithm=key_algorithm,
        rsa_key_size=rsa_bits,
        ec_curve=curve,
        pkcs8=env_bool("PKCS8_KEY", False),
        secret_ttl_s=int(env_duration("SECRET_TTL", "24h")),
        grace_ratio=envr.number("SECRET_GRACE_PERIOD_RATIO", 0.5, 0.0, 1.0),
        grace_jitter=envr.number("SECRET_GRACE_PERIOD_RATIO_JITTER", 0.01, 0.0, 1.0),
        cert_signer=env.get("ISTIO_META_CERT_SIGNER", ""),
    )

    # 5. Hosts file: resolves the istiod name to the east-west gateway, like the VM guide's /etc/hosts line.
    hosts: dict[str, list[str]] = {}
    hosts_text = _read_text(files["hosts"], "hosts", errs)
    if hosts_text is not None:
        entries, host_problems = parse_hosts(hosts_text)
        for line, msg in host_problems:
            errs.add(files["hosts"], "", msg, line)
        for e in entries:
            for name in e.names:
                hosts.setdefault(name, []).append(e.address)

    # 6. Paths.
    state_dir = opts.state_dir or Path(env.get("VM_AGENT_STATE_DIR") or root / VM_PATHS["state_dir"])
    config_path_dir = _resolve_path(root, proxy.config_path)
    prov_cert = env.get("PROV_CERT")
    root_cert = files["root_cert"]
    ca_root_env = env.get("CA_ROOT_CA", "")
    if opts.config_dir is None and prov_cert:
        root_cert = _resolve_path(root, prov_cert) / "root-cert.pem"
    if ca_root_env and ca_root_env != "SYSTEM":
        root_cert = _resolve_path(root, ca_root_env)
    output_certs_env = env.get("OUTPUT_CERTS")
    paths = Paths(
        root=root,
        cluster_env=files["cluster_env"],
        sidecar_env=sidecar_env_path,
        mesh_config=files["mesh_config"],
        root_cert=root_cert,
        token=files["token"],
        hosts=files["hosts"],
        resolv_conf=opts.resolv_conf or Path(env.get("VM_AGENT_RESOLV_CONF") or root / VM_PATHS["resolv_conf"]),
        state_dir=state_dir,
        proxy_config_dir=config_path_dir,
        xds_socket=config_path_dir / "XDS",
        sds_socket=Path(env["VM_AGENT_SDS_SOCKET"])
        if env.get("VM_AGENT_SDS_SOCKET")
        else root / VM_PATHS["sds_socket"],
        output_certs=_resolve_path(root, output_certs_env) if output_certs_env else None,
    )
    for label, sock in (("xds socket", paths.xds_socket), ("sds socket", paths.sds_socket)):
        if len(str(sock)) > 107:
            errs.add(str(sock), "", f"{label} path is {len(str(sock))} bytes; Unix sockets allow at most 107")

    # 7. Root certificate and token.
    root_data: bytes | None = None
    try:
        root_data = paths.root_cert.read_bytes()
    except FileNotFoundError:
        errs.add(paths.root_cert, "", "root certificate not found: expected the mesh root (istioctl's root-cert.pem)")
    except OSError as err:
        errs.add(paths.root_cert, "", f"root certificate: cannot read: {err.strerror}")
    if root_data is not None:
        bad = check_pem_certificates(root_data)
        if bad:
            errs.add(paths.root_cert, "", bad)
    try:
        token_text = paths.token.read_text(encoding="utf-8", errors="replace").strip()
        if not token_text:
            errs.add(paths.token, "", "token is empty: expected the service-account JWT istioctl wrote")
        elif token_text.count(".") != 2:
            errs.add(paths.token, "", "token is not a JWT: expected three dot-separated parts")
    except FileNotFoundError:
        errs.add(paths.token, "", "token not found: expected the service-account JWT istioctl wrote")
    except OSError as err:
        errs.add(paths.token, "", f"token: cannot read: {err.strerror}")

    # 8. Addresses.
    def upstream(address: str, key: str, san_override: str, headers_prefix: str) -> Upstream:
        hp = _split_host_port(address)
        if hp is None:
            env_problem(key, f"expected host:port, got {address!r}")
            hp = (DEFAULT_ISTIOD_HOST, 15012)
        host, port = hp
        listed = hosts.get(host.lower())
        dial_host = listed[0] if listed else host
        extra = tuple(
            (k[len(headers_prefix) :].lower(), v) for k, v in sorted(env.items()) if k.startswith(headers_prefix)
        )
        return Upstream(
            address=address,
            host=host,
            port=port,
            dial_target=_join_host_port(dial_host, port),
            server_name=_tls_server_name(host, san_override),
            plaintext=port == 15010,
            root_cert=paths.root_cert,
            extra_metadata=extra,
        )

    discovery = upstream(proxy.discovery_address, "discoveryAddress", env.get("ISTIOD_SAN", ""), "XDS_HEADER_")
    ca = upstream(ca_addr, "CA_ADDR", "", "CA_HEADER_")

    # 9. Instance IPs (§2): INSTANCE_IP (= ISTIO_SVC_IP) first, then the interfaces.
    svc_ip = env.get("INSTANCE_IP") or env.get("ISTIO_SVC_IP", "")
    ips: list[str] = []
    if svc_ip:
        if is_ip(svc_ip):
            ips.append(str(ipaddress.ip_address(svc_ip)))
        else:
            env_problem("ISTIO_SVC_IP", f"expected an IP address, got {svc_ip!r}")
    scan_env = env.get("VM_AGENT_SCAN_INTERFACES")
    scan = opts.scan_interfaces if scan_env is None else env_bool("VM_AGENT_SCAN_INTERFACES", True)
    if scan:
        try:
            scanned = _scan_interface_ips()
        except OSError as err:
            env_problem("VM_AGENT_SCAN_INTERFACES", f"cannot list network interfaces ({err}); set ISTIO_SVC_IP")
            scanned = []
        if not scanned and not ips:
            scanned = ["127.0.0.1", "::1"]
        ips.extend(ip for ip in scanned if ip not in ips)
    if not ips:
        ips = ["127.0.0.1"]
    instance_ips = tuple(ips)

    # 10. Node id, cluster, metadata (§6).
    envoy_status_port = envr.port("ENVOY_STATUS_PORT", 15021)
    envoy_prom_port = envr.port("ENVOY_PROMETHEUS_PORT", 15090)
    node = build_node(
        envr,
        proxy,
        role=role,
        instance_ips=instance_ips,
        pod_name=pod_name,
        namespace=namespace,
        service_account=service_account,
        pilot_san=_tls_server_name(discovery.host, ""),
        envoy_status_port=envoy_status_port,
        envoy_prometheus_port=envoy_prom_port,
    )
    dns_domain = node.dns_domain

    # 11. DNS proxy (§10.1). Product decision: it listens on loopback and forwards before the first NameTable.
    # A gateway runs none (pilot-agent starts its DNS proxy for sidecars only), whatever istioctl's files say.
    sidecar = role == "sidecar"
    dns_capture = sidecar and env_bool("ISTIO_META_DNS_CAPTURE", False)
    dns_enabled = dns_capture or (sidecar and env_bool("ISTIO_META_ENABLE_DNS_SERVER", False))
    resolv = parse_resolv_conf("")
    if dns_enabled:
        resolv_text = _read_text(paths.resolv_conf, "resolv.conf", errs)
        if resolv_text is not None:
            resolv = parse_resolv_conf(resolv_text)
            if not resolv.nameservers:
                errs.add(paths.resolv_conf, "nameserver", "expected at least one nameserver to forward to")
    dns_addr = env.get("DNS_PROXY_ADDR") or "localhost:15053"
    dns_hp = _split_host_port(dns_addr)
    listen: list[tuple[str, int]] = []
    if dns_hp is None:
        env_problem("DNS_PROXY_ADDR", f"expected host:port, got {dns_addr!r}")
        dns_hp = ("localhost", 15053)
    if dns_hp[0] == "localhost":
        listen.append(("127.0.0.1", dns_hp[1]))
        if any(":" in s for s in resolv.nameservers) or any(":" in ip for ip in instance_ips[:1]):
            listen.append(("::1", dns_hp[1]))
    else:
        listen.append(dns_hp)
    domain_labels = dns_domain.split(".", 1)
    dns = DnsConfig(
        enabled=dns_enabled,
        capture=dns_capture,
        listen=tuple(listen),
        upstreams=tuple((s, 53) for s in resolv.nameservers),
        search_domains=resolv.search,
        proxy_domain=domain_labels[1] if len(domain_labels) > 1 else "",
        forward_timeout_s=env_duration("DNS_FORWARD_TIMEOUT", "5s"),
        forward_parallel=env_bool("DNS_FORWARD_PARALLEL", False),
    )

    # 12. Capture (§11.1).
    envoy_user = env.get("ENVOY_USER") or "istio-proxy"
    try:
        default_uid = pwd.getpwnam(envoy_user).pw_uid
    except KeyError:
        default_uid = 1337
    uid_text = env.get("PROXY_UID", "")
    gid_text = env.get("PROXY_GID", "")
    proxy_uid = int(uid_text) if uid_text.isdigit() else default_uid
    proxy_gid = int(gid_text) if gid_text.isdigit() else proxy_uid  # Istio: GID defaults to the UID number
    interception = (env.get("ISTIO_INBOUND_INTERCEPTION_MODE") or "REDIRECT").upper()
    if interception not in ("REDIRECT", "TPROXY"):
        env_problem("ISTIO_INBOUND_INTERCEPTION_MODE", f"expected REDIRECT or TPROXY, got {interception!r}")
    capture = CaptureConfig(
        enabled=sidecar and not env_bool("ISTIO_CUSTOM_IP_TABLES", False) and proxy.interception_mode != "NONE",
        interception_mode=interception,
        inbound_ports=env.get("ISTIO_INBOUND_PORTS", "*") or "*",
        local_exclude_ports=envr.ports("ISTIO_LOCAL_EXCLUDE_PORTS"),
        service_cidr=env.get("ISTIO_SERVICE_CIDR", "*") or "*",
        service_exclude_cidr=envr.list("ISTIO_SERVICE_EXCLUDE_CIDR"),
        outbound_ports=envr.ports("ISTIO_OUTBOUND_PORTS"),
        outbound_exclude_ports=envr.ports("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"),
        exclude_interfaces=envr.list("ISTIO_EXCLUDE_INTERFACES"),
        proxy_uid=proxy_uid,
        proxy_gid=proxy_gid,
        dns_capture=dns_capture and env_bool("REDIRECT_DNS", True),
        capture_all_dns=env_bool("CAPTURE_ALL_DNS", False),
    )
    inbound = capture.inbound_ports
    if inbound != "*":
        for part in inbound.split(","):
            if part.strip() and (not part.strip().isdigit() or not 1 <= int(part) <= 65535):
                env_problem("ISTIO_INBOUND_PORTS", f"expected '*' or a comma-separated list of ports, got {part!r}")

    # 13. Agent knobs (ours, and pilot-agent's flags that matter on a VM).
    envoy_binary = env.get("VM_AGENT_ENVOY_BINARY") or None
    if envoy_binary is None and proxy.binary_path != PROXY_CONFIG_DEFAULTS["binaryPath"]:
        envoy_binary = proxy.binary_path
    log_level, component = proxy_log_level(env.get("ISTIO_AGENT_FLAGS", ""))
    heartbeat = env_duration("VM_AGENT_HEALTH_HEARTBEAT", "0")
    if (why := heartbeat_problem(heartbeat)) is not None:
        env_problem("VM_AGENT_HEALTH_HEARTBEAT", why)
    envoy_group = env.get("VM_AGENT_ENVOY_GROUP") or None
    if envoy_group is not None:
        import grp

        try:
            grp.getgrnam(envoy_group)
        except KeyError:
            env_problem("VM_AGENT_ENVOY_GROUP", f"expected an existing group for Envoy, got {envoy_group!r}")
            envoy_group = None
    agent = AgentConfig(
        status_host=env.get("VM_AGENT_STATUS_HOST") or "127.0.0.1",
        envoy_binary=envoy_binary,
        envoy_status_port=envoy_status_port,
        envoy_prometheus_port=envoy_prom_port,
        delta_xds=env_bool("ISTIO_DELTA_XDS", True),
        health_heartbeat_s=heartbeat if why is None else 0.0,
        endpoint_hold_s=env_duration("VM_AGENT_EDS_HOLD", "45s"),
        auto_register_group=str(node.metadata.get("AUTO_REGISTER_GROUP", "")),
        rewrite_probe_localhost=env_bool("REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION", False),
        proxy_log_level=log_level,
        proxy_component_log_level=component,
        metrics_localhost_only=proxy.proxy_metadata.get("METRICS_LOCALHOST_ACCESS_ONLY", "").lower() == "true",
        envoy_group=envoy_group,
        manage_capture=env_bool("VM_AGENT_MANAGE_CAPTURE", False),
        role=role,
        native_stats=env_bool("VM_AGENT_NATIVE_STATS", True),
    )

    config = Config(
        paths=paths,
        env=env,
        proxy=proxy,
        node=node,
        discovery=discovery,
        ca=ca,
        identity=identity,
        dns=dns,
        capture=capture,
        agent=agent,
        hosts={k: tuple(v) for k, v in hosts.items()},
        problems=tuple(errs.problems),
    )
    if strict and errs.problems:
        raise ConfigError(errs.problems)
    return config
