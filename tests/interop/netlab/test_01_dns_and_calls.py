"""Scenarios 1 and 2: the system resolver through DNS capture, and a mesh call through both Envoys."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.interop.netlab.vm import APP_UID, PROXY_UID, TCP_PORT
from tests.interop.netlab.world import FORUM_HOST, OUTSIDE_NAME, SHOP_HOST, NetLab

pytestmark = [pytest.mark.interop]


def test_system_resolver_answers_mesh_and_other_names(lab: NetLab) -> None:
    assert lab.cp is not None
    webapp = lab.vms["webapp"]
    svc = lab.cp.get("service", "forum", "forum")
    assert svc is not None
    cluster_ip = svc["spec"]["clusterIP"]
    for name in (FORUM_HOST, "forum.forum"):
        got = webapp.app("resolve", name=name)
        assert got.get("addresses") == [cluster_ip], (name, got)

    # A name the mesh does not know goes to the upstream resolver in its own namespace, sent by the agent.
    got = webapp.app("resolve", name=OUTSIDE_NAME)
    assert got.get("addresses") == ["10.77.0.30"], got
    assert f"query[A] {OUTSIDE_NAME} from {webapp.host.ip}" in lab.dnsmasq_log()

    # A ServiceEntry host without addresses: istiod's allocator gives it a 240.240/16 address, in status and in DNS.
    entry = lab.cp.get("serviceentries.networking.istio.io", "webapp", "shop")
    assert entry is not None
    allocated = [a["value"] for a in entry.get("status", {}).get("addresses", []) if ":" not in a["value"]]
    got = webapp.app("resolve", name=SHOP_HOST)
    assert got.get("addresses") == allocated, (got, allocated)
    assert ipaddress.ip_address(allocated[0]) in ipaddress.ip_network("240.240.0.0/16")
    # ... and reachable only through Envoy (the bridge drops anything else): the outsider's app answers.
    result = webapp.app("get", url=f"http://{SHOP_HOST}/", count=1)["results"][0]
    assert result["status"] == 200 and result["app"] == "outsider", result


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def test_mesh_call_carries_the_caller_identity(lab: NetLab) -> None:
    webapp = lab.vms["webapp"]
    # As on a real VM: Envoy runs as the proxy user (its traffic leaves uncaptured), the app as another user.
    for vm in lab.vms.values():
        envoy = vm.envoy_pid()
        assert envoy is not None and _uid(envoy) == PROXY_UID
        assert vm.app_proc is not None and _uid(vm.app("ping")["pid"]) == APP_UID
    results = webapp.app("get", url=f"http://{FORUM_HOST}/", count=20)["results"]
    assert all(r["status"] == 200 for r in results), results
    for r in results:
        assert r["app"] == "forum"
        xfcc = r["headers"].get("x-forwarded-client-cert", "")
        assert "URI=spiffe://cluster.local/ns/webapp/sa/webapp" in xfcc, xfcc
        # The request came to the app from forum's own Envoy, never straight from webapp.
    assert {r["version"] for r in results} <= {"v1", "v2"}


def test_tcp_port_echoes_one_mebibyte_unchanged(lab: NetLab) -> None:
    webapp = lab.vms["webapp"]
    out = webapp.app("tcp_echo", host=FORUM_HOST, port=TCP_PORT, size=1 << 20, timeout=60)
    assert out.get("error") is None, out
    assert out["sent"] == out["received"] == 1 << 20, out
    assert out["identical"] and out["sha256_sent"] == out["sha256_received"], out
