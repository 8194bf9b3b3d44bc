"""Command line: argument parsing and sub-commands only; the work happens in the packages."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from vm_agent import ISTIO_COMPAT_VERSION, __version__, logs
from vm_agent.config import Config, Options, load

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_PROBLEMS = 2


def _add_config_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--root", type=Path, default=Path("/"), help="prefix for every default path (tests, chroots); default /"
    )
    where.add_argument(
        "--config-dir",
        type=Path,
        help="folder holding istioctl's five files (cluster.env, mesh.yaml, hosts, root-cert.pem, istio-token)",
    )
    p.add_argument(
        "--gateway",
        action="store_true",
        help="run an Istio gateway (node type router: no capture, DNS proxy or probe); same as VM_AGENT_ROLE=gateway",
    )
    p.add_argument("--state-dir", type=Path, help="where the agent keeps its key and certificates")
    p.add_argument("--resolv-conf", type=Path, help="the resolv.conf whose nameservers DNS forwards to")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one environment/cluster.env variable (repeatable)",
    )


def _options(ns: argparse.Namespace) -> Options:
    extra: dict[str, str] = {}
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: expected KEY=VALUE, got {item!r}")
        extra[key] = value
    if getattr(ns, "gateway", False):
        extra["VM_AGENT_ROLE"] = "gateway"
    root: Path = ns.root if getattr(ns, "config_dir", None) is None else Path("/")
    return Options(
        root=root,
        config_dir=ns.config_dir,
        state_dir=ns.state_dir,
        resolv_conf=ns.resolv_conf,
        extra_env=extra,
    )


def _print_summary(config: Config) -> None:
    doc = config.to_json()
    rows = [
        ("node id", doc["node_id"]),
        ("identity", doc["spiffe_id"]),
        ("role", doc["role"]),
        ("cluster id", doc["cluster_id"] or "(empty: istiod's own cluster)"),
        ("discovery", f"{doc['discovery_address']} via {doc['discovery_dial_target']}"),
        ("CA", f"{doc['ca_address']} via {doc['ca_dial_target']}"),
        ("instance IPs", ", ".join(doc["instance_ips"])),
        ("auto-register", doc["auto_register_group"] or "(no: bound to a pre-created WorkloadEntry or none)"),
        ("DNS capture", "on" if doc["dns_capture"] else "off"),
        ("readiness probe", json.dumps(doc["readiness_probe"]) if doc["readiness_probe"] else "(none)"),
        ("state folder", doc["paths"]["state_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_check(ns: argparse.Namespace) -> int:
    config = load(_options(ns))
    if ns.json:
        print(json.dumps(config.to_json(), indent=2, sort_keys=False))
    else:
        _print_summary(config)
        if config.problems:
            print(f"\n{len(config.problems)} problem(s):")
            for problem in config.problems:
                print(f"  {problem}")
        else:
            print("\nno problems")
    return EXIT_PROBLEMS if config.problems else EXIT_OK


def cmd_doctor(ns: argparse.Namespace) -> int:
    from vm_agent.doctor import doctor_command

    return doctor_command(load(_options(ns)), ns.json)


def cmd_version(ns: argparse.Namespace) -> int:
    # The interpreter too: the package runs on whichever supported CPython the machine has.
    python = ".".join(map(str, sys.version_info[:3]))
    if ns.json:
        print(json.dumps({"version": __version__, "istio_compat": ISTIO_COMPAT_VERSION, "python": python}))
    else:
        print(f"vm-agent {__version__} (speaks Istio {ISTIO_COMPAT_VERSION} agent protocols; Python {python})")
    return EXIT_OK


def cmd_run(ns: argparse.Namespace) -> int:
    from vm_agent.agent import run_agent

    config = load(_options(ns))
    return run_agent(config, log_as_json=ns.log_format == "json")


def cmd_status(ns: argparse.Namespace) -> int:
    from vm_agent.status import status_command

    return int(status_command(ns.url, ns.json))


def cmd_netfilter(ns: argparse.Namespace) -> int:
    from vm_agent.agent import capture_settings
    from vm_agent.netfilter import run_command

    config = load(_options(ns))
    blocking = [p for p in config.problems if p.file in (str(config.paths.cluster_env), "environment", "--set")]
    if blocking and ns.action == "apply":
        for p in blocking:
            print(p, file=sys.stderr)
        return EXIT_PROBLEMS
    action = ns.action
    if action == "apply" and not config.capture.enabled:
        # The unit's ExecStartPre runs this for every role: with capture off there is nothing to apply, and rules
        # left by an earlier sidecar configuration must not keep redirecting this host's traffic.
        print(f"# capture is off ({_capture_off_reason(config)}): removing any vm-agent rules instead")
        action = "cleanup"
    return int(run_command(action, capture_settings(config), backend=ns.backend, dry_run=ns.dry_run))


def _capture_off_reason(config: Config) -> str:
    if config.agent.role != "sidecar":
        return f"role {config.agent.role}"
    if config.proxy.interception_mode == "NONE":
        return "interceptionMode NONE"
    return "ISTIO_CUSTOM_IP_TABLES=true"


def cmd_mesh(ns: argparse.Namespace) -> int:
    from vm_agent.mesh import MeshSettings
    from vm_agent.mesh import cli as mesh_cli

    what = ns.mesh_command
    if what == "serve":
        settings = MeshSettings(
            state_dir=ns.state,
            manifests_dir=ns.manifests,
            listen=ns.listen,
            plaintext_listen=ns.plaintext_listen,
            admin_listen=ns.admin_listen,
            server_names=tuple(dict.fromkeys(["istiod.istio-system.svc", *ns.server_name])),
            server_ips=tuple(dict.fromkeys(["127.0.0.1", *ns.server_ip])),
            trust_domain=ns.trust_domain,
            cluster_id=ns.cluster_id,
            grace_period_s=ns.grace_period,
        )
        return asyncio.run(mesh_cli.mesh_serve(settings))
    if what == "get":
        return asyncio.run(
            mesh_cli.mesh_get(ns.kind, output=ns.output, admin_url=ns.admin_url, state=ns.state, namespace=ns.namespace)
        )
    if what in ("apply", "delete"):
        fn = mesh_cli.mesh_apply if what == "apply" else mesh_cli.mesh_delete
        return asyncio.run(fn(ns.file, admin_url=ns.admin_url, state=ns.state))
    if ns.cloud_init != (ns.package is not None):
        print("vm-agent mesh vm-files: --cloud-init and --package URL_OR_PATH go together", file=sys.stderr)
        return EXIT_PROBLEMS
    return asyncio.run(
        mesh_cli.mesh_vm_files(
            state=ns.state,
            group=ns.group,
            namespace=ns.namespace,
            out=ns.out,
            token_ttl=ns.token_ttl,
            ingress_ip=ns.ingress_ip,
            internal_ip=ns.internal_ip,
            cluster_id=ns.cluster_id,
            autoregister=ns.autoregister,
            capture_dns=ns.capture_dns,
            admin_url=ns.admin_url,
            manifests=ns.manifests,
            cloud_init_package=ns.package if ns.cloud_init else None,
        )
    )


def _add_mesh_parsers(p: argparse.ArgumentParser) -> None:
    msub = p.add_subparsers(dest="mesh_command", required=True)
    s = msub.add_parser("serve", help="run the local mesh (CA + xDS on one TLS port, admin API on loopback)")
    s.add_argument("--state", type=Path, required=True, help="state folder: mesh CA root, issuer key, manifests")
    s.add_argument("--manifests", type=Path, help="folder of Kubernetes/Istio YAML manifests, reloaded on change")
    s.add_argument("--listen", default="127.0.0.1:15012", help="TLS port for CA and xDS (default 127.0.0.1:15012)")
    s.add_argument("--plaintext-listen", help="optional plaintext xDS port, like istiod's 15010")
    s.add_argument("--admin-listen", default="127.0.0.1:15014", help="admin HTTP API (default 127.0.0.1:15014)")
    s.add_argument("--server-name", action="append", default=[], help="extra DNS name in the serving certificate")
    s.add_argument("--server-ip", action="append", default=[], help="extra IP in the serving certificate")
    s.add_argument("--trust-domain", default="cluster.local")
    s.add_argument("--cluster-id", default="Kubernetes")
    s.add_argument("--grace-period", type=float, default=10.0, help="seconds before a disconnected entry is deleted")
    g = msub.add_parser("get", help="list workloadentries, proxies or the nametable (kubectl-style)")
    g.add_argument("kind", choices=("workloadentries", "proxies", "nametable"))
    g.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    g.add_argument("-n", "--namespace")
    for name in ("apply", "delete"):
        a = msub.add_parser(name, help=f"{name} objects from a manifest file through the admin API")
        a.add_argument("-f", "--file", type=Path, required=True)
    v = msub.add_parser("vm-files", help="write the five files istioctl x workload entry configure writes")
    v.add_argument("--group", required=True, help="WorkloadGroup name")
    v.add_argument("--namespace", "-n", required=True)
    v.add_argument("--out", type=Path, required=True)
    v.add_argument("--token-ttl", default="1h")
    v.add_argument("--ingress-ip", help="address of istiod as the VM reaches it (hosts file)")
    v.add_argument("--internal-ip", help="the VM's address (ISTIO_SVC_IP)")
    v.add_argument("--cluster-id")
    v.add_argument("--autoregister", action="store_true")
    v.add_argument("--capture-dns", action=argparse.BooleanOptionalAction, default=True)
    v.add_argument("--manifests", type=Path, help="read the WorkloadGroup from this folder instead of the admin API")
    v.add_argument(
        "--cloud-init",
        action="store_true",
        help="also write user-data: a #cloud-config placing the files, installing --package, starting vm-agent",
    )
    v.add_argument("--package", metavar="URL_OR_PATH", help="where the VM gets vm-agent's deb or rpm (--cloud-init)")
    for sp in (g, *[msub.choices[n] for n in ("apply", "delete")], v):
        sp.add_argument(
            "--state", type=Path, required=sp is v, help="the mesh's state folder (finds its admin address)"
        )
        sp.add_argument("--admin-url", help="the mesh's admin API, default http://127.0.0.1:15014")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vm-agent", description="Joins this VM to an Istio service mesh (a drop-in for istio-sidecar)."
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="read the configuration, print it and every problem (exit 2 on problems)")
    _add_config_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("doctor", help="check everything this VM needs to join the mesh, with fixes (exit 1 on failure)")
    _add_config_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (schema in docs/doctor.md)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("version", help="print the version")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    _add_config_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="summarise a running agent (identity, Envoy, xDS, health, DNS)")
    p.add_argument("--url", default="http://127.0.0.1:15020", help="the agent's status server")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("netfilter", help="traffic and DNS capture rules")
    p.add_argument("action", choices=("apply", "cleanup", "show"))
    p.add_argument("--dry-run", action="store_true", help="print what would be applied or removed")
    p.add_argument("--backend", choices=("auto", "iptables", "nft"), default="auto")
    _add_config_options(p)
    p.set_defaults(func=cmd_netfilter)

    p = sub.add_parser("mesh", help="the built-in local mesh (an istiod stand-in for first runs and tests)")
    _add_mesh_parsers(p)
    p.set_defaults(func=cmd_mesh)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logs.setup(ns.log_level, ns.log_format)
    try:
        return int(ns.func(ns))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
