"""The five VM files, written the way ``istioctl x workload entry configure`` writes them
(istioctl/pkg/workload/workload.go): cluster.env, mesh.yaml, hosts, root-cert.pem, istio-token."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vm_agent.mesh.settings import ISTIOD_HOST

FILE_MODE = 0o744  # istioctl writes every file (and the folder) with 0744
PROXY_CONFIG_ANNOTATION = "proxy.istio.io/config"
DEFAULT_XDS_PORT = 15012


class VmFilesError(ValueError):
    """The WorkloadGroup or an option cannot produce VM files (the message names which)."""


@dataclass(frozen=True)
class VmFilesOptions:
    cluster_id: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    ingress_ip: str | None = None
    internal_ip: str | None = None
    autoregister: bool = False
    capture_dns: bool = True
    # Port the mesh serves xDS/CA on; anything but 15012 is written as discoveryAddress and CA_ADDR.
    xds_port: int = DEFAULT_XDS_PORT
    mesh_default_config: Mapping[str, Any] | None = None
    # A control-plane revision (istioctl --revision): names istiod-<rev>.istio-system.svc.
    revision: str = ""

    @property
    def istiod_host(self) -> str:
        return f"istiod-{self.revision}.istio-system.svc" if self.revision else ISTIOD_HOST

    @property
    def non_default_address(self) -> str | None:
        """discoveryAddress/CA_ADDR to write, when the agent's default would be wrong."""
        if self.revision or self.xds_port != DEFAULT_XDS_PORT:
            return f"{self.istiod_host}:{self.xds_port}"
        return None


# -- Go's encoders, reproduced where their output differs from Python's -----------------------------


def _go_key_less(a: str, b: str) -> bool:
    """yaml.v2's map key order (letters before other runes, digit runs compared as numbers)."""
    ar, br = list(a), list(b)
    for i in range(min(len(ar), len(br))):
        if ar[i] == br[i]:
            continue
        al, bl = ar[i].isalpha(), br[i].isalpha()
        if al and bl:
            return ar[i] < br[i]
        if al or bl:
            return bl
        an = bn = 0
        if ar[i] == "0" or br[i] == "0":
            j = i - 1
            while j >= 0 and ar[j].isdigit():
                if ar[j] != "0":
                    an = bn = 1
                    break
                j -= 1
        ai = i
        while ai < len(ar) and ar[ai].isdigit():
            an = an * 10 + int(ar[ai])
            ai += 1
        bi = i
        while bi < len(br) and br[bi].isdigit():
            bn = bn * 10 + int(br[bi])
            bi += 1
        if an != bn:
            return an < bn
        if ai != bi:
            return ai < bi
        return ar[i] < br[i]
    return len(ar) < len(br)


def _go_cmp(x: str, y: str) -> int:
    if x == y:
        return 0
    return -1 if _go_key_less(x, y) else 1


def _go_sorted(keys: list[str]) -> list[str]:
    return sorted(keys, key=functools.cmp_to_key(_go_cmp))


class _GoYamlDumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # yaml.v2 double-quotes strings that would otherwise read back as another type ("true", "", "1").
    resolved = dumper.resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
    style = '"' if resolved != "tag:yaml.org,2002:str" else None
    if "\n" in value:
        style = "|"
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _represent_dict(dumper: yaml.SafeDumper, value: dict[str, Any]) -> yaml.Node:
    items = [(k, value[k]) for k in _go_sorted([str(k) for k in value])]
    return dumper.represent_mapping("tag:yaml.org,2002:map", items)


_GoYamlDumper.add_representer(str, _represent_str)
_GoYamlDumper.add_representer(dict, _represent_dict)


def go_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_GoYamlDumper, default_flow_style=False, allow_unicode=True, width=1 << 30)


def go_json(data: Any) -> str:
    """encoding/json: sorted keys, compact, <>& escaped."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


# -- the files ------------------------------------------------------------------------------------


def _canonical(labels: Mapping[str, str], wg_name: str) -> tuple[str, str]:
    name = next(
        (labels[k] for k in ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app") if labels.get(k)),
        wg_name,
    )
    rev = next(
        (
            labels[k]
            for k in ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
            if labels.get(k)
        ),
        "latest",
    )
    return name, rev


def _merge_proxy_config(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overlay.items():
        if k == "proxyMetadata" and isinstance(v, Mapping):
            out["proxyMetadata"] = {**(out.get("proxyMetadata") or {}), **v}
        else:
            out[k] = v
    return out


def _annotation_config(annotations: Mapping[str, Any] | None, where: str) -> Mapping[str, Any]:
    text = (annotations or {}).get(PROXY_CONFIG_ANNOTATION)
    if not text:
        return {}
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise VmFilesError(f"{where}.annotations[{PROXY_CONFIG_ANNOTATION}]: not valid YAML: {e}") from e
    if not isinstance(parsed, dict):
        raise VmFilesError(f"{where}.annotations[{PROXY_CONFIG_ANNOTATION}]: expected a ProxyConfig mapping")
    return parsed


def render_vm_files(
    group: Mapping[str, Any], token: str, root_cert_pem: bytes, opts: VmFilesOptions
) -> dict[str, bytes]:
    """file name → content, from a WorkloadGroup in Kubernetes shape."""
    meta = group.get("metadata") or {}
    name, ns = meta.get("name"), meta.get("namespace")
    if not name or not ns:
        raise VmFilesError("WorkloadGroup: metadata.name and metadata.namespace are required")
    spec = group.get("spec") or {}
    gmeta = spec.get("metadata") or {}
    template = spec.get("template") or {}
    sa = template.get("serviceAccount") or "default"

    labels: dict[str, str] = {**(gmeta.get("labels") or {}), **(template.get("labels") or {})}
    canonical_name, canonical_rev = _canonical(labels, str(name))
    labels["service.istio.io/canonical-name"] = canonical_name
    labels["service.istio.io/canonical-revision"] = canonical_rev

    proxy_config: dict[str, Any] = dict(opts.mesh_default_config or {})
    if opts.non_default_address and not proxy_config.get("discoveryAddress"):
        proxy_config["discoveryAddress"] = opts.non_default_address
    proxy_config = _merge_proxy_config(proxy_config, _annotation_config(meta.get("annotations"), "metadata"))
    proxy_config = _merge_proxy_config(proxy_config, _annotation_config(gmeta.get("annotations"), "spec.metadata"))

    pm: dict[str, str] = {str(k): str(v) for k, v in (proxy_config.get("proxyMetadata") or {}).items()}
    pm["CANONICAL_SERVICE"] = canonical_name
    pm["CANONICAL_REVISION"] = canonical_rev
    pm["POD_NAMESPACE"] = str(ns)
    pm["SERVICE_ACCOUNT"] = str(sa)
    pm["TRUST_DOMAIN"] = opts.trust_domain
    pm["ISTIO_META_CLUSTER_ID"] = opts.cluster_id
    pm["ISTIO_META_MESH_ID"] = str(proxy_config.get("meshId") or "")
    pm["ISTIO_META_NETWORK"] = str(template.get("network") or "")
    pm["ISTIO_META_WORKLOAD_NAME"] = str(name)
    ports: Mapping[str, int] = template.get("ports") or {}
    if ports:
        pm["ISTIO_META_POD_PORTS"] = go_json(
            [{"name": n, "containerPort": ports[n], "protocol": ""} for n in sorted(ports)]
        )[0:]
    pm["ISTIO_METAJSON_LABELS"] = go_json(labels)
    if opts.capture_dns:
        pm["ISTIO_META_DNS_CAPTURE"] = "true"
    if opts.autoregister:
        pm["ISTIO_META_AUTO_REGISTER_GROUP"] = str(name)
    proxy_config["proxyMetadata"] = pm
    if spec.get("probe") is not None:
        proxy_config["readinessProbe"] = spec["probe"]

    env = dict(pm)
    env["ISTIO_INBOUND_PORTS"] = ",".join(str(ports[n]) for n in sorted(ports)) if ports else "*"
    env["ISTIO_NAMESPACE"] = str(ns)
    env["ISTIO_SERVICE"] = f"{name}.{ns}"
    env["ISTIO_SERVICE_CIDR"] = "*"
    env["ISTIO_LOCAL_EXCLUDE_PORTS"] = "22,15090,15021" + _status_port_exclusion(proxy_config.get("statusPort"))
    env["SERVICE_ACCOUNT"] = str(sa)
    if opts.non_default_address:
        env["CA_ADDR"] = opts.non_default_address
    if opts.internal_ip:
        env["ISTIO_SVC_IP"] = opts.internal_ip
    cluster_env = "".join(f"{k}={_shell_quote(env[k])}\n" for k in sorted(env))

    hosts = f"{opts.ingress_ip} {opts.istiod_host}\n" if opts.ingress_ip else ""
    return {
        "cluster.env": cluster_env.encode(),
        "mesh.yaml": go_yaml({"defaultConfig": proxy_config}).encode(),
        "hosts": hosts.encode(),
        "root-cert.pem": root_cert_pem,
        "istio-token": token.encode(),
    }


def _status_port_exclusion(status_port: Any) -> str:
    if not status_port:
        return ",15020"
    if int(status_port) in (15090, 15021):
        return ""
    return f",{int(status_port)}"


def write_vm_files(out_dir: Path, files: Mapping[str, bytes]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True, mode=FILE_MODE)
    for fname, content in files.items():
        path = out_dir / fname
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(path, FILE_MODE)


def parse_duration(text: str) -> int:
    """``1h``, ``30m``, ``3600s``, ``3600`` → seconds (istioctl's --tokenDuration is seconds)."""
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError as e:
        raise VmFilesError(f"--token-ttl: expected a duration like 1h, 30m or 3600s, got {text!r}") from e
    if value <= 0:
        raise VmFilesError(f"--token-ttl: must be positive, got {text!r}")
    return value
