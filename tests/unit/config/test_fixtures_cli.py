"""`vm-agent check` on real istioctl output (issue 2 acceptance), through the real command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.unit.config.conftest import FAKE_JWT, FIXTURES, FixtureFactory


def run_check(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    base_env = {"PATH": "/usr/bin:/bin", "VM_AGENT_SCAN_INTERFACES": "false", "POD_NAME": "vm1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vm_agent", "check", *args, "--json"],
        capture_output=True,
        text=True,
        env={**base_env, **(env or {})},
        timeout=60,
    )
    return proc.returncode, json.loads(proc.stdout), proc.stdout + proc.stderr


@pytest.mark.parametrize("sample", ["ipv4", "ipv6", "nil-proxy-metadata"])
def test_istioctl_samples_parse_and_report_placeholders(sample: str) -> None:
    rc, doc, _ = run_check("--config-dir", str(FIXTURES / sample), "--resolv-conf", "/dev/null")
    assert rc == 2
    ip = "fd00:10:96::1" if sample == "ipv6" else "10.10.10.10"
    assert str(doc["node_id"]).startswith(f"sidecar~{ip}~")
    assert str(doc["node_id"]).endswith("~bar.svc.cluster.local")
    assert doc["namespace"] == "bar"
    assert doc["service_account"] == "vm-serviceaccount"
    assert doc["cluster_id"] == "Kubernetes"
    assert doc["dns_capture"] is True
    assert doc["readiness_probe"] == {"httpGet": {"port": 8080}}
    problems = [str(p) for p in doc["problems"]]
    assert any("root-cert.pem" in p and "PEM" in p for p in problems), problems
    assert any("istio-token" in p and "empty" in p for p in problems), problems
    for key in (
        "trust_domain",
        "spiffe_id",
        "discovery_address",
        "ca_address",
        "auto_register_group",
        "instance_ips",
    ):
        assert key in doc


@pytest.mark.parametrize("sample", ["ipv4", "ipv6", "nil-proxy-metadata"])
def test_real_certificate_and_token_exit_zero(fixture_copy: FixtureFactory, sample: str) -> None:
    folder = fixture_copy(sample)
    rc, doc, out = run_check("--config-dir", str(folder), "--resolv-conf", str(fixture_copy.resolv_conf))
    assert rc == 0, out
    assert doc["problems"] == []
    assert FAKE_JWT not in out  # the token is never printed
    assert "BEGIN CERTIFICATE" not in out


def test_ipv4_derived_addresses_and_identity() -> None:
    rc, doc, _ = run_check("--config-dir", str(FIXTURES / "ipv4"), "--resolv-conf", "/dev/null")
    assert rc == 2
    # The revisioned istiod name is resolved through istioctl's hosts file, TLS still verifies the name.
    assert doc["discovery_address"] == "istiod-rev-1.istio-system.svc:15012"
    assert doc["discovery_dial_target"] == "10.10.10.11:15012"
    assert doc["discovery_server_name"] == "istiod-rev-1.istio-system.svc"
    assert doc["ca_address"] == "istiod-rev-1.istio-system.svc:15012"
    assert doc["spiffe_id"] == "spiffe://cluster.local/ns/bar/sa/vm-serviceaccount"
    assert doc["instance_ips"] == ["10.10.10.10"]
    assert doc["node_id"] == "sidecar~10.10.10.10~vm1.bar~bar.svc.cluster.local"


def test_ipv6_hosts_entry_is_bracketed() -> None:
    _, doc, _ = run_check("--config-dir", str(FIXTURES / "ipv6"), "--resolv-conf", "/dev/null")
    assert doc["discovery_dial_target"] == "[fd00:10:96::2]:15012"


def test_root_option_uses_vm_guide_paths(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy("ipv4")
    # Unix socket paths under the root must stay short (107 bytes), so not under pytest's deep tmp_path.
    root = Path(tempfile.mkdtemp(prefix="vmr", dir="/tmp"))
    layout = {
        "cluster.env": "var/lib/istio/envoy/cluster.env",
        "mesh.yaml": "etc/istio/config/mesh",
        "hosts": "etc/hosts",
        "root-cert.pem": "etc/certs/root-cert.pem",
        "istio-token": "var/run/secrets/tokens/istio-token",
    }
    for src, dst in layout.items():
        target = root / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((folder / src).read_bytes())
    (root / "etc/resolv.conf").write_text("nameserver 127.0.0.53\n")
    try:
        rc, doc, out = run_check("--root", str(root))
    finally:
        shutil.rmtree(root)
    assert rc == 0, out
    assert doc["paths"]["root_cert"] == str(root / "etc/certs/root-cert.pem")
    assert doc["paths"]["state_dir"] == str(root / "var/lib/vm-agent")
