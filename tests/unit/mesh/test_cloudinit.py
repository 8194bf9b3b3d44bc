"""The #cloud-config `vm-agent mesh vm-files --cloud-init` writes (vm_agent/mesh/cloudinit.py)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from vm_agent.config.loader import VM_PATHS
from vm_agent.mesh.cloudinit import PLACEMENTS, CloudInitError, render_cloud_config, template

REPO = Path(__file__).resolve().parents[3]
FILES = {
    "cluster.env": b"ISTIO_META_AUTO_REGISTER_GROUP='vm-app'\nISTIO_METAJSON_LABELS='{\"app\":\"vm-app\"}'\n",
    "mesh.yaml": b"defaultConfig:\n  proxyMetadata:\n    TRUST_DOMAIN: cluster.local\n",
    "hosts": b"10.0.0.5 istiod.istio-system.svc\n",
    "root-cert.pem": b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "istio-token": b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
}


def _doc(text: str) -> dict[str, object]:
    assert text.startswith("#cloud-config\n"), "cloud-init only reads a document whose first line says so"
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def _written(doc: dict[str, object]) -> dict[str, dict[str, object]]:
    files = doc["write_files"]
    assert isinstance(files, list)
    return {entry["path"]: entry for entry in files}


def test_files_land_on_the_guides_paths_with_their_modes_and_exact_content() -> None:
    doc = _doc(render_cloud_config(FILES, "/var/tmp/vm-agent.deb"))
    assert list(doc) == ["write_files", "runcmd"], "the user-data does nothing else"
    written = _written(doc)
    expected = {
        "/etc/certs/root-cert.pem": ("root-cert.pem", "0644"),
        "/var/run/secrets/tokens/istio-token": ("istio-token", "0600"),
        "/var/lib/istio/envoy/cluster.env": ("cluster.env", "0644"),
        "/etc/istio/config/mesh": ("mesh.yaml", "0644"),
    }
    for path, (name, mode) in expected.items():
        entry = written[path]
        assert entry["permissions"] == mode and entry["owner"] == "root:root"
        assert str(entry["content"]).encode() == FILES[name], f"{path}: content changed on the way"
    hosts = written["/etc/hosts"]
    assert hosts["append"] is True and hosts["content"] == FILES["hosts"].decode()
    assert "owner" not in hosts and "permissions" not in hosts, "/etc/hosts keeps its own owner and mode"


def test_runcmd_installs_hands_the_files_to_the_agent_and_starts_it_in_order() -> None:
    doc = _doc(render_cloud_config(FILES, "/var/tmp/vm-agent.deb"))
    runcmd = doc["runcmd"]
    assert isinstance(runcmd, list) and len(runcmd) == 1
    script = str(runcmd[0]).splitlines()
    assert script[0] == "set -e", "a failed install must not go on to start anything"
    install = next(i for i, line in enumerate(script) if "apt-get install -y /var/tmp/vm-agent.deb" in line)
    chown = next(i for i, line in enumerate(script) if line.startswith("chown istio-proxy:istio-proxy "))
    start = script.index("systemctl enable --now --no-block vm-agent.service")
    assert install < chown < start
    owned = script[chown].split()[2:]
    assert sorted(owned) == sorted(p.path for p in PLACEMENTS), "every file of istioctl's goes to the agent's user"


@pytest.mark.parametrize(
    ("package", "expect"),
    [
        ("https://example.com/v/vm-agent_1_amd64.deb", "curl -fsSL --retry 5 -o /var/tmp/vm-agent.deb"),
        ("/srv/vm-agent-1.x86_64.rpm", "dnf install -y /srv/vm-agent-1.x86_64.rpm"),
        ("https://example.com/vm-agent-1.x86_64.rpm", "dnf install -y https://example.com/vm-agent-1.x86_64.rpm"),
    ],
)
def test_install_command_follows_the_package_kind(package: str, expect: str) -> None:
    script = str(_doc(render_cloud_config(FILES, package))["runcmd"][0])  # type: ignore[index]
    assert expect in script


@pytest.mark.parametrize(
    ("package", "message"),
    [
        ("vm-agent.deb", "expected an http(s) URL or an absolute path"),
        ("/tmp/vm-agent.tar.gz", "expected a .deb or an .rpm"),
        ("ftp://host/vm-agent.deb", "expected an http(s) URL or an absolute path"),
    ],
)
def test_bad_package_location_is_refused_with_the_option_named(package: str, message: str) -> None:
    with pytest.raises(CloudInitError, match="--package") as err:
        render_cloud_config(FILES, package)
    assert message in str(err.value)


def test_missing_file_is_named() -> None:
    files = {k: v for k, v in FILES.items() if k != "istio-token"}
    with pytest.raises(CloudInitError, match="istio-token"):
        render_cloud_config(files, "/var/tmp/vm-agent.deb")


def test_no_hosts_entry_when_istioctl_wrote_none_and_binary_content_survives() -> None:
    files = {**FILES, "hosts": b"", "root-cert.pem": b"\xff\x00not utf-8"}
    written = _written(_doc(render_cloud_config(files, "/var/tmp/vm-agent.deb")))
    assert "/etc/hosts" not in written
    cert = written["/etc/certs/root-cert.pem"]
    assert cert["encoding"] == "b64" and base64.b64decode(str(cert["content"])) == files["root-cert.pem"]


def test_paths_are_the_ones_the_agent_reads() -> None:
    by_name = {p.name: p.path for p in PLACEMENTS}
    assert by_name["cluster.env"] == "/" + VM_PATHS["cluster_env"]
    assert by_name["mesh.yaml"] == "/" + VM_PATHS["mesh_config"]
    assert by_name["root-cert.pem"] == "/" + VM_PATHS["root_cert"]
    assert by_name["istio-token"] == "/" + VM_PATHS["token"]


def test_documented_template_is_what_the_renderer_writes() -> None:
    committed = (REPO / "packaging" / "cloud-init" / "user-data.yaml").read_text()
    assert committed == template(), (
        "packaging/cloud-init/user-data.yaml is stale; regenerate it with\n"
        "  .venv/bin/python -c 'from vm_agent.mesh.cloudinit import template; print(template(), end=\"\")' "
        "> packaging/cloud-init/user-data.yaml"
    )
