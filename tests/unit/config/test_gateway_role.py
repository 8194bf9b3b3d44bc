"""The gateway role (`vm-agent run --gateway`, VM_AGENT_ROLE=gateway): pilot-agent's `proxy router` on a VM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.unit.config.conftest import FixtureFactory
from vm_agent.config import Config, Options, load


def _without_probe(folder: Path) -> Path:
    mesh = yaml.safe_load((folder / "mesh.yaml").read_text())
    mesh["defaultConfig"].pop("readinessProbe")
    (folder / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    return folder


def _load(folder: Path, resolv: Path, **env: str) -> Config:
    return load(Options(config_dir=folder, resolv_conf=resolv, environ=env, scan_interfaces=False, hostname="gw1"))


def test_gateway_is_a_router_without_capture_dns_or_probe(fixture_copy: FixtureFactory) -> None:
    folder = _without_probe(fixture_copy())
    config = _load(
        folder,
        fixture_copy.resolv_conf,
        VM_AGENT_ROLE="gateway",
        ISTIO_META_ROUTER_MODE="sni-dnat",
        ISTIO_META_REQUESTED_NETWORK_VIEW="network1",
        ISTIO_METAJSON_LABELS='{"istio":"eastwestgateway","app":"istio-eastwestgateway"}',
    )
    assert config.problems == ()
    assert config.agent.role == "gateway"
    # pilot-agent's node id for `proxy router`: the same parts as a sidecar's, type router.
    assert config.node.id == "router~10.10.10.10~gw1.bar~bar.svc.cluster.local"
    md = config.node.metadata
    assert md["ROUTER_MODE"] == "sni-dnat"
    assert md["REQUESTED_NETWORK_VIEW"] == "network1"
    assert md["LABELS"] == {"istio": "eastwestgateway", "app": "istio-eastwestgateway"}
    # istioctl's files say DNS capture and '*' inbound ports; a gateway takes neither.
    assert not config.capture.enabled
    assert not config.dns.enabled and not config.dns.capture
    assert config.proxy.readiness_probe is None


def test_sidecar_stays_the_default(fixture_copy: FixtureFactory) -> None:
    config = _load(fixture_copy(), fixture_copy.resolv_conf)
    assert config.agent.role == "sidecar"
    assert config.node.id.startswith("sidecar~")
    assert config.capture.enabled and config.dns.capture


def test_gateway_with_a_probe_is_refused_naming_the_setting(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy()
    config = _load(folder, fixture_copy.resolv_conf, VM_AGENT_ROLE="gateway")
    [problem] = config.problems
    assert problem.file == str(folder / "mesh.yaml")
    assert problem.key == "defaultConfig.readinessProbe"
    assert "gateway role" in problem.message


def test_gateway_with_capture_is_refused_naming_the_setting(fixture_copy: FixtureFactory) -> None:
    folder = _without_probe(fixture_copy())
    config = _load(
        folder,
        fixture_copy.resolv_conf,
        VM_AGENT_ROLE="gateway",
        PROXY_CONFIG=json.dumps({"interceptionMode": "REDIRECT"}),
        VM_AGENT_MANAGE_CAPTURE="true",
    )
    keys = {(p.file, p.key) for p in config.problems}
    assert keys == {("PROXY_CONFIG", "interceptionMode"), ("environment", "VM_AGENT_MANAGE_CAPTURE")}
    # Saying NONE outright is consistent with a gateway.
    ok = _load(folder, fixture_copy.resolv_conf, VM_AGENT_ROLE="gateway", PROXY_CONFIG='{"interceptionMode": "NONE"}')
    assert ok.problems == ()


def test_unknown_role_names_the_key(fixture_copy: FixtureFactory) -> None:
    config = _load(fixture_copy(), fixture_copy.resolv_conf, VM_AGENT_ROLE="egress")
    [problem] = config.problems
    assert (problem.file, problem.key) == ("environment", "VM_AGENT_ROLE")
    assert "expected sidecar or gateway" in problem.message


def test_cli_gateway_flag_and_check(fixture_copy: FixtureFactory) -> None:
    folder = _without_probe(fixture_copy())
    res = subprocess.run(
        [sys.executable, "-m", "vm_agent", "check", f"--config-dir={folder}", "--gateway", "--json",
         f"--resolv-conf={fixture_copy.resolv_conf}", "--set=VM_AGENT_SCAN_INTERFACES=false"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["role"] == "gateway" and doc["node_id"].startswith("router~")
    assert doc["capture"]["enabled"] is False and doc["dns"]["enabled"] is False
    # With the probe istioctl wrote from the WorkloadGroup, the same command refuses and says where.
    res = subprocess.run(
        [sys.executable, "-m", "vm_agent", "check", f"--config-dir={fixture_copy('ipv6')}", "--gateway",
         f"--resolv-conf={fixture_copy.resolv_conf}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 2
    assert "defaultConfig.readinessProbe" in res.stdout and "gateway role" in res.stdout
