"""DNS capture end to end: ``dig`` inside a namespace, the real DNS proxy as the proxy uid, a test
upstream resolver on a loopback address standing in for the resolv.conf nameserver."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.netfilter.conftest import NetNs, require_tools
from vm_agent.netfilter import CaptureSettings, apply, cleanup, show

pytestmark = [pytest.mark.system]

DNS_HELPER = Path(__file__).with_name("_dns_in_netns.py")
PROXY = 1337
RESOLVER = "127.0.0.53"  # like systemd-resolved's stub: the resolv.conf nameserver
UPSTREAM_ANSWER = "192.0.2.99"  # what the upstream says for any name
MESH_NAME = "reviews.bookinfo.svc.cluster.local"
MESH_IP = "10.96.0.10"  # what the NameTable says; only the proxy knows it
ELSEWHERE = "10.200.0.99"  # routable in the namespace, nothing there


def dig(ns: NetNs, server: str, name: str, *opts: str) -> str:
    out = ns.run("dig", f"@{server}", name, "A", "+short", "+time=2", "+tries=1", *opts, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return f"(no answer, dig exit {out.returncode}: {(out.stdout + out.stderr).strip().splitlines()[0]})"
    return out.stdout.strip()


@pytest.mark.parametrize("backend", ["iptables", "nft"])
def test_dig_is_answered_by_the_proxy_and_forwarded_upstream(netns: NetNs, backend: str) -> None:
    require_tools("dig", "nft" if backend == "nft" else "iptables-restore")
    netns.start("dns-upstream", RESOLVER, "53", UPSTREAM_ANSWER)
    netns.start(
        "--listen", "127.0.0.1:15053", "--upstream", f"{RESOLVER}:53", "--name", f"{MESH_NAME}={MESH_IP}",
        uid=PROXY, script=DNS_HELPER,
    )  # fmt: skip
    # Baseline: without capture the resolver answers everything itself.
    assert dig(netns, RESOLVER, MESH_NAME) == UPSTREAM_ANSWER

    apply(CaptureSettings(dns_servers_v4=(RESOLVER,)), backend, netns=netns.name)
    for transport in ("+notcp", "+tcp"):
        assert dig(netns, RESOLVER, MESH_NAME, transport) == MESH_IP, transport
        # Not a mesh name: the proxy forwards it, and its own query (proxy uid) is not captured
        # again; a loop would end in a timeout here.
        assert dig(netns, RESOLVER, "example.org", transport) == UPSTREAM_ANSWER, transport
    # Only the resolv.conf servers are captured by default.
    assert dig(netns, ELSEWHERE, MESH_NAME, "+time=1").startswith("(no answer")

    apply(CaptureSettings(capture_all_dns=True), backend, netns=netns.name)
    for transport in ("+notcp", "+tcp"):
        assert dig(netns, ELSEWHERE, MESH_NAME, transport) == MESH_IP, transport
        assert dig(netns, ELSEWHERE, "example.org", transport) == UPSTREAM_ANSWER, transport

    cleanup(netns=netns.name)
    assert show(netns=netns.name) == ""
    assert "VMAGENT" not in netns.run("iptables-save").stdout
    assert dig(netns, RESOLVER, MESH_NAME) == UPSTREAM_ANSWER
    assert dig(netns, ELSEWHERE, MESH_NAME, "+time=1").startswith("(no answer")
