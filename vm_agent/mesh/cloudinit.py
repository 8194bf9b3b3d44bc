"""istioctl's five VM files as a ``#cloud-config``: on the VM's first boot cloud-init places them where
Istio's VM guide puts them, installs the vm-agent package and starts the agent. Nothing else.

cloud-init writes files (``write_files``, init stage) before it runs commands (``runcmd``, final
stage), and the agent's user only exists once the package is installed; so the files are written
root-owned first (the token 0600), and the one ``runcmd`` script installs the package, hands them to
``istio-proxy`` (as the guide's ``chown``) and enables the unit. packaging/cloud-init/ holds the
documented template this renders (``template()``).
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

AGENT_USER = "istio-proxy"
UNIT = "vm-agent.service"
HEADER = "#cloud-config\n"


class CloudInitError(ValueError):
    """The files or the package location cannot make a cloud-config (the message names which)."""


@dataclass(frozen=True)
class Placement:
    """Where one of istioctl's files goes on the VM (the Istio VM guide's path) and its mode."""

    name: str
    path: str
    mode: str


# The Istio VM guide's paths (vm-agent reads the same ones by default). The token is the only
# secret: 0600, readable by the agent's user alone once runcmd hands it over.
PLACEMENTS = (
    Placement("root-cert.pem", "/etc/certs/root-cert.pem", "0644"),
    Placement("istio-token", "/var/run/secrets/tokens/istio-token", "0600"),
    Placement("cluster.env", "/var/lib/istio/envoy/cluster.env", "0644"),
    Placement("mesh.yaml", "/etc/istio/config/mesh", "0644"),
)
HOSTS_PATH = "/etc/hosts"  # istioctl's hosts file is appended, as the guide's `cat hosts >> /etc/hosts`

# What the documented template shows where istioctl's files go.
PLACEHOLDERS = {
    "root-cert.pem": b"-----BEGIN CERTIFICATE-----\n(root-cert.pem from istioctl x workload entry configure)\n"
    b"-----END CERTIFICATE-----\n",
    "istio-token": b"(istio-token from istioctl x workload entry configure)",
    "cluster.env": b"(cluster.env from istioctl x workload entry configure)\n",
    "mesh.yaml": b"(mesh.yaml from istioctl x workload entry configure)\n",
    "hosts": b"(hosts from istioctl: the istiod name and the address the VM reaches it at)\n",
}
PLACEHOLDER_PACKAGE = "https://example.com/vm-agent_VERSION_amd64.deb"


def _install_command(package: str) -> str:
    """Shell lines installing the deb or rpm at ``package`` (an https URL or a path on the VM)."""
    remote = package.startswith(("https://", "http://"))
    if not remote and not package.startswith("/"):
        raise CloudInitError(f"--package {package!r}: expected an http(s) URL or an absolute path on the VM")
    if package.endswith(".rpm"):
        # dnf (and yum) take a URL or a path and resolve the interpreter dependency themselves.
        q = shlex.quote(package)
        return f"if command -v dnf >/dev/null 2>&1; then dnf install -y {q}; else yum install -y {q}; fi\n"
    if not package.endswith(".deb"):
        raise CloudInitError(f"--package {package!r}: expected a .deb or an .rpm file")
    lines = "export DEBIAN_FRONTEND=noninteractive\n"
    local = package
    if remote:
        local = "/var/tmp/vm-agent.deb"
        lines += f"curl -fsSL --retry 5 -o {local} {shlex.quote(package)}\n"
    q = shlex.quote(local)
    # apt resolves the dependencies (a python3 it can use); the package lists are refreshed only
    # when something is missing from them.
    return lines + f"apt-get install -y {q} || {{ apt-get update && apt-get install -y {q}; }}\n"


def _content(data: bytes) -> dict[str, str]:
    try:
        return {"content": data.decode()}
    except UnicodeDecodeError:
        return {"encoding": "b64", "content": base64.b64encode(data).decode()}


class _Dumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # Files and the script read as they are on disk (a literal block), not as one escaped line.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render_cloud_config(files: Mapping[str, bytes], package: str) -> str:
    """The ``#cloud-config`` for istioctl's ``files`` (name → content) and the package at ``package``."""
    missing = [p.name for p in PLACEMENTS if p.name not in files]
    if missing:
        raise CloudInitError(f"istioctl's files lack {', '.join(missing)}")
    install = _install_command(package)
    write_files: list[dict[str, Any]] = [
        {"path": p.path, "owner": "root:root", "permissions": p.mode, **_content(files[p.name])} for p in PLACEMENTS
    ]
    hosts = files.get("hosts", b"")
    if hosts.strip():
        write_files.append({"path": HOSTS_PATH, "append": True, **_content(hosts)})
    owned = " ".join(p.path for p in PLACEMENTS)
    script = (
        "set -e\n"
        f"{install}"
        f"chown {AGENT_USER}:{AGENT_USER} {owned}\n"
        # --no-block: the boot goes on while the agent gets its certificate (it retries on its own).
        f"systemctl enable --now --no-block {UNIT}\n"
    )
    doc = {"write_files": write_files, "runcmd": [script]}
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1 << 30)
    return (
        HEADER + "# vm-agent joins this VM to the Istio mesh: istioctl's files where the Istio VM guide puts them,\n"
        "# then the package installed and vm-agent.service enabled and started.\n" + body
    )


def template() -> str:
    """The documented template (packaging/cloud-init/user-data.yaml): placeholders for the files."""
    text = render_cloud_config(PLACEHOLDERS, PLACEHOLDER_PACKAGE)
    how = (
        "# Template: `vm-agent mesh vm-files --cloud-init --package URL_OR_PATH` writes this filled in. By hand,\n"
        "# replace each (...) with the file istioctl wrote (keep the indentation) and the package URL with\n"
        "# where the VM downloads vm-agent's deb (for an rpm: its URL or path; dnf installs it).\n"
    )
    return text.replace(HEADER, HEADER + how, 1)
