"""IPv6 capture (ip6tables-restore / nft ip6 rules) in a namespace with a v6 instance address."""

from __future__ import annotations

import pytest

from tests.system.netfilter.conftest import NetNs, require_tools
from tests.system.netfilter.test_dns_capture_netns import DNS_HELPER, MESH_IP, MESH_NAME, dig
from vm_agent.netfilter import CaptureSettings, apply, cleanup

pytestmark = [pytest.mark.system]

PROXY = 1337
INSTANCE_V6 = "fd00:200::2"
ELSEWHERE_V6 = "fd00:200::77"  # routable, nothing there
RESOLVER_V6 = "fd00:200::53"  # the resolv.conf nameserver; nothing there either


@pytest.mark.parametrize("backend", ["iptables", "nft"])
def test_ipv6_outbound_probe_and_dns_paths(netns: NetNs, backend: str) -> None:
    require_tools("dig", "nft" if backend == "nft" else "ip6tables-restore")
    netns.run("ip", "-6", "addr", "add", f"{INSTANCE_V6}/64", "dev", "inst0", "nodad")
    netns.run("ip", "-6", "route", "add", "default", "via", "fd00:200::1", "dev", "inst0")
    # Dual-stack listeners: one socket each sees both families.
    netns.start("listen", "::", "8080", "app")
    netns.start("listen", "::", "15001", "envoy-outbound")
    netns.start("listen", "::", "15006", "envoy-inbound")
    netns.start(
        "--listen", "127.0.0.1:15053", "--listen", "[::1]:15053", "--name", f"{MESH_NAME}={MESH_IP}",
        uid=PROXY, script=DNS_HELPER,
    )  # fmt: skip
    apply(CaptureSettings(ipv6=True, dns_servers_v6=(RESOLVER_V6,)), backend, netns=netns.name)

    assert netns.tool("connect", ELSEWHERE_V6, "80") == "envoy-outbound"
    assert netns.tool("connect", "10.200.0.77", "80") == "envoy-outbound"
    assert netns.tool("connect", ELSEWHERE_V6, "80", "--timeout", "1", uid=PROXY).startswith("error")
    # apply() put ::6 on lo, so a probe can bind it and reach the app, not Envoy's 15006.
    assert netns.tool("connect", INSTANCE_V6, "8080", "--source", "::6", uid=PROXY) == "app"
    assert netns.tool("connect", INSTANCE_V6, "8080", uid=PROXY) == "envoy-inbound"
    assert dig(netns, RESOLVER_V6, MESH_NAME) == MESH_IP
    assert dig(netns, RESOLVER_V6, MESH_NAME, "+tcp") == MESH_IP

    # IPv6 capture off: v6 traffic is left alone entirely, v4 is still captured.
    apply(CaptureSettings(ipv6=False, dns_capture=False), backend, netns=netns.name)
    assert netns.tool("connect", ELSEWHERE_V6, "80", "--timeout", "1").startswith("error")
    assert netns.tool("connect", "10.200.0.77", "80") == "envoy-outbound"
    assert "VMAGENT" not in netns.run("ip6tables-save").stdout

    cleanup(netns=netns.name)
    assert "VMAGENT" not in netns.run("ip6tables-save").stdout + netns.run("iptables-save").stdout
    assert "vm_agent" not in netns.run("nft", "list", "ruleset").stdout
    assert netns.tool("connect", ELSEWHERE_V6, "80", "--timeout", "1").startswith("error")
