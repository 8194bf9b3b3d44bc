"""Derivations that istiod reads: node id, metadata quirks, ProxyConfig layering, addresses (§2, §3, §6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.config.conftest import FixtureFactory
from vm_agent.config import Options, load
from vm_agent.config.formats import parse_duration, parse_resolv_conf
from vm_agent.config.shellenv import parse, render


def _load(folder: Path, resolv: Path, **env: str):  # type: ignore[no-untyped-def]
    return load(Options(config_dir=folder, resolv_conf=resolv, environ=env, scan_interfaces=False, hostname="vm1"))


def test_shell_parsing_quotes_escapes_export_comments() -> None:
    text = "# c\nexport A='x y'\nB=\"q\\\"uote $A ${MISSING:-d}\" # tail\nC=plain\\ text\nD='it'\\''s'\n"
    assignments, errors = parse(text, {})
    assert errors == []
    assert {a.key: a.value for a in assignments} == {"A": "x y", "B": 'q"uote x y d', "C": "plain text", "D": "it's"}


def test_shell_parsing_refuses_code() -> None:
    _, errors = parse("A=`id`\nB=$(id)\nC=ok; rm -rf /\n", {})
    assert [e.line for e in errors] == [1, 2, 3]


def test_render_round_trips() -> None:
    values = {"B": "it's", "A": "", "C": '{"a":"b"}'}
    assignments, errors = parse(render(values), {})
    assert errors == []
    assert {a.key: a.value for a in assignments} == values
    assert render(values).splitlines()[0] == "A=''"


def test_durations() -> None:
    assert parse_duration("1m30s") == 90
    assert parse_duration("300ms") == 0.3
    assert parse_duration("1h") == 3600


def test_resolv_conf() -> None:
    rc = parse_resolv_conf("# x\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nsearch a.example b.example.\n")
    assert rc.nameservers == ("127.0.0.53", "fe80::1")
    assert rc.search == ("a.example", "b.example")


def test_metajson_quirk_and_typed_metadata(fixture_copy: FixtureFactory) -> None:
    c = _load(fixture_copy(), fixture_copy.resolv_conf)
    md = c.node.metadata
    # ISTIO_METAJSON_LABELS lands both as LABELS and at the top level (pilot-agent quirk istiod relies on).
    assert md["LABELS"] == {"service.istio.io/canonical-name": "foo", "service.istio.io/canonical-revision": "latest"}
    assert md["service.istio.io/canonical-name"] == "foo"
    assert md["CLUSTER_ID"] == "Kubernetes"
    assert md["DNS_CAPTURE"] == "true"
    assert md["MESH_ID"] == ""  # empty values stay present
    assert md["INSTANCE_IPS"] == "10.10.10.10"
    assert md["ENVOY_STATUS_PORT"] == 15021 and md["ENVOY_PROMETHEUS_PORT"] == 15090
    assert md["NAMESPACE"] == "bar" and md["NAME"] == "vm1"
    assert md["PILOT_SAN"] == ["istiod-rev-1.istio-system.svc"]
    assert md["PROXY_CONFIG"]["readinessProbe"] == {"httpGet": {"port": 8080}}
    assert md["PROXY_CONFIG"]["serviceCluster"] == "foo.bar"
    assert c.node.cluster == "foo.bar"


def test_environment_overrides_cluster_env(fixture_copy: FixtureFactory) -> None:
    c = _load(fixture_copy(), fixture_copy.resolv_conf, ISTIO_SVC_IP="127.0.0.2", ISTIO_META_NETWORK="net1")
    assert c.node.instance_ips == ("127.0.0.2",)
    assert c.node.id == "sidecar~127.0.0.2~vm1.bar~bar.svc.cluster.local"
    assert c.node.metadata["NETWORK"] == "net1"


def test_proxy_config_env_layers_over_mesh(fixture_copy: FixtureFactory) -> None:
    env = {
        "PROXY_CONFIG": "statusPort: 25020\nproxyMetadata:\n  EXTRA: x\nreadinessProbe:\n  tcpSocket:\n    port: 9\n"
    }
    c = _load(fixture_copy(), fixture_copy.resolv_conf, **env)
    assert c.proxy.status_port == 25020
    assert c.proxy.proxy_metadata["EXTRA"] == "x"
    assert c.proxy.proxy_metadata["CANONICAL_SERVICE"] == "foo"  # merged key-wise, not replaced
    assert c.proxy.readiness_probe is not None and c.proxy.readiness_probe.to_json() == {"tcpSocket": {"port": 9}}
    # A user PROXY_CONFIG replaces istio-start.sh's default serviceCluster line, as in istio-start.sh.
    assert c.proxy.service_cluster == "istio-proxy"
    assert c.node.cluster == "foo.bar"  # app label → <app>.<ns>


def test_pilot_address_sets_discovery_and_ca(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy("nil-proxy-metadata")
    c = _load(folder, fixture_copy.resolv_conf, PILOT_ADDRESS="istiod.example:15012")
    assert c.discovery.address == "istiod.example:15012"
    assert c.ca.address == "istiod.example:15012"


def test_default_addresses_and_localhost_server_name(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy("nil-proxy-metadata")
    c = _load(folder, fixture_copy.resolv_conf, CA_ADDR="localhost:15012", ISTIOD_SAN="custom.san")
    assert c.discovery.address == "istiod.istio-system.svc:15012"
    assert c.discovery.server_name == "custom.san"
    assert c.ca.server_name == "istiod.istio-system.svc"  # localhost → istiod's name; ISTIOD_SAN not for CA_ADDR


def test_dns_settings_from_resolv_conf(fixture_copy: FixtureFactory) -> None:
    c = _load(fixture_copy(), fixture_copy.resolv_conf, DNS_FORWARD_TIMEOUT="2s")
    assert c.dns.enabled and c.dns.capture
    assert c.dns.listen == (("127.0.0.1", 15053),)
    assert c.dns.upstreams == (("127.0.0.53", 53),)
    assert c.dns.search_domains == ("corp.example",)
    assert c.dns.proxy_domain == "svc.cluster.local"
    assert c.dns.forward_timeout_s == 2.0


def test_capture_settings(fixture_copy: FixtureFactory) -> None:
    c = _load(fixture_copy(), fixture_copy.resolv_conf, PROXY_UID="999")
    assert c.capture.inbound_ports == "*"
    assert c.capture.local_exclude_ports == (22, 15090, 15021, 15020)
    assert c.capture.proxy_uid == 999 and c.capture.proxy_gid == 999  # GID defaults to the UID number


def test_empty_trust_domain_uses_mesh_default(fixture_copy: FixtureFactory) -> None:
    c = _load(fixture_copy(), fixture_copy.resolv_conf)
    assert c.identity.trust_domain == "cluster.local"
    c2 = _load(
        fixture_copy.__class__(fixture_copy.tmp_path / "x")(), fixture_copy.resolv_conf, TRUST_DOMAIN="td.example"
    )
    assert c2.identity.spiffe_id == "spiffe://td.example/ns/bar/sa/vm-serviceaccount"


def test_unknown_envoy_group_is_a_problem(fixture_copy: FixtureFactory) -> None:
    c = _load(fixture_copy(), fixture_copy.resolv_conf, VM_AGENT_ENVOY_GROUP="no-such-group-xyz")
    assert any(p.key == "VM_AGENT_ENVOY_GROUP" and "existing group" in p.message for p in c.problems)
    assert c.agent.envoy_group is None
    ok = _load(
        fixture_copy.__class__(fixture_copy.tmp_path / "g")(), fixture_copy.resolv_conf, VM_AGENT_ENVOY_GROUP="root"
    )
    assert ok.agent.envoy_group == "root"


def test_interface_scan_failure_is_a_problem_not_a_crash(
    fixture_copy: FixtureFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vm_agent.config import loader

    def no_proc() -> list[str]:
        raise OSError("[Errno 2] No such file or directory: '/proc/net/dev'")

    monkeypatch.setattr(loader, "_scan_interface_ips", no_proc)
    c = load(Options(config_dir=fixture_copy(), resolv_conf=fixture_copy.resolv_conf, environ={}, hostname="vm1"))
    assert any(p.key == "VM_AGENT_SCAN_INTERFACES" and "/proc/net/dev" in p.message for p in c.problems)
    assert c.node.instance_ips == ("10.10.10.10",)  # ISTIO_SVC_IP from cluster.env still leads
