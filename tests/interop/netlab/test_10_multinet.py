"""The multi-network issue: a VM on vm-net, which cannot route to network1, joined through east-west gateways that
vm-agent runs in the gateway role (`vm-agent run --gateway`), configured by istiod from Istio's own manifests."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.interop.netlab import envoyview
from tests.interop.netlab.multinet import (
    EASTWEST_VMNET_IP,
    GATEWAY_CONCURRENCY,
    ISTIOD_IP,
    LEDGER_HOST,
    LEDGER_IP,
    VM_NET,
    VMGW_NET1_IP,
    MultiNetwork,
    gateway_service,
)
from tests.interop.netlab.vm import HTTP_PORT, PROXY_UID
from tests.interop.netlab.world import FORUM_HOST, NetLab, RequestStream, forum_by_version, remove_forum_routing

pytestmark = [pytest.mark.interop]
FORUM_URL = f"http://{FORUM_HOST}/"
FORUM_CLUSTER = f"outbound|80||{FORUM_HOST}"
FORUM_SNI = f"outbound_.80_._.{FORUM_HOST}"


def test_vm_gets_identity_and_config_through_the_gateway_only(lab: NetLab, multinet: MultiNetwork) -> None:
    assert multinet.ledger is not None and lab.cp is not None
    ledger = multinet.ledger
    # No route from vm-net to network1: a direct connection to istiod, from the proxy user (whose traffic the
    # capture rules let out untouched), goes nowhere.
    probe = ledger.host.run(
        "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", "/usr/bin/python3", "-c",
        f"import socket; socket.create_connection(('{ISTIOD_IP}', 15012), 3)", check=False,
    )  # fmt: skip
    assert probe.returncode != 0 and ("timed out" in probe.stderr or "unreachable" in probe.stderr), probe.stderr
    # Yet the agent holds istiod's certificate and Envoy istiod's config: both came through the gateway.
    status = ledger.status()
    assert status is not None
    assert (
        status["identity"]["valid_now"]
        and status["identity"]["spiffe_id"] == "spiffe://cluster.local/ns/ledger/sa/ledger"
    )
    assert status["xds"]["upstream"]["state"] == "connected"
    assert envoyview.active_cluster(ledger, FORUM_CLUSTER) is not None
    # istiod sees the ledger VM's stream arrive from the gateway's network1 address, not from the VM's own.
    clients = lab.cp.istiod_debug("connections").get("clients", [])
    # Connection ids are <pod>.<namespace>-<n>.
    ledger_conns = [c for c in clients if c.get("connectionId", "").rsplit("-", 1)[0].endswith(".ledger")]
    assert ledger_conns, [c.get("connectionId") for c in clients]
    assert all(c["address"].rsplit(":", 1)[0] == "10.77.0.5" for c in ledger_conns), ledger_conns
    eastwest = multinet.gateways["eastwest"]
    assert envoyview.connections(eastwest, "outbound|15012||istiod.istio-system.svc.cluster.local") > 0


def test_vm_calls_network1_service_through_the_gateway_with_mtls(lab: NetLab, multinet: MultiNetwork) -> None:
    assert multinet.ledger is not None
    ledger, eastwest = multinet.ledger, multinet.gateways["eastwest"]
    # istiod hands the VM the gateway, on 15443, in place of every network1 endpoint, with Istio's SNI.
    assert envoyview.endpoints(ledger, FORUM_CLUSTER) == [f"{EASTWEST_VMNET_IP}:15443"]
    assert envoyview.mtls_sni(ledger, FORUM_CLUSTER) == FORUM_SNI
    results = ledger.app("get", url=FORUM_URL, count=20)["results"]
    assert all(r["status"] == 200 and r["app"] == "forum" for r in results), results
    for r in results:
        # mTLS end to end through the gateway: forum's Envoy saw the VM's own certificate.
        assert "URI=spiffe://cluster.local/ns/ledger/sa/ledger" in r["headers"]["x-forwarded-client-cert"]
    # Only the VM's calls cross networks: the gateway's SNI cluster for forum carried them (pooled connections).
    assert envoyview.connections(eastwest, FORUM_SNI) > 0


def _webapp_results(lab: NetLab, count: int, timeout: float = 5) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = lab.vms["webapp"].app(
        "get", url=f"http://{LEDGER_HOST}/", count=count, timeout=timeout
    )["results"]
    return results


def test_network1_workload_reaches_the_vm_through_vm_nets_gateway(lab: NetLab, multinet: MultiNetwork) -> None:
    """Istio routes a call to an endpoint on another network through that network's gateway, and hands out the
    endpoint's own address when that network has none (pilot/pkg/xds/endpoints/ep_filters.go). vm-net has a
    gateway here (`vmgw`, vm-agent in the gateway role), so webapp on network1 reaches the VM through it; with the
    gateway's Service gone, istiod hands out 10.88.0.21 itself, which network1 cannot reach."""
    assert lab.cp is not None and multinet.ledger is not None
    webapp, vmgw = lab.vms["webapp"], multinet.gateways["vmgw"]
    cluster = f"outbound|80||{LEDGER_HOST}"
    assert envoyview.endpoints(webapp, cluster) == [f"{VMGW_NET1_IP}:15443"]
    sni = f"outbound_.80_._.{LEDGER_HOST}"
    assert envoyview.mtls_sni(webapp, cluster) == sni
    results = _webapp_results(lab, 10)
    assert all(r["status"] == 200 and r["app"] == "ledger" for r in results), results
    assert all(
        "URI=spiffe://cluster.local/ns/webapp/sa/webapp" in r["headers"]["x-forwarded-client-cert"] for r in results
    )
    assert envoyview.connections(vmgw, sni) > 0

    # Without a gateway for vm-net, istiod gives network1 the VM's own address: unreachable from network1.
    lab.cp.kubectl("-n", "istio-system", "delete", "service", "istio-vmgateway")
    try:
        lab.until(
            lambda: envoyview.endpoints(webapp, cluster) == [f"{LEDGER_IP}:{HTTP_PORT}"],
            30,
            "the VM's own address in webapp's EDS",
        )
        r = _webapp_results(lab, 1, timeout=15)[0]
        assert r["status"] != 200, r
    finally:
        lab.cp.apply(gateway_service("istio-vmgateway", "vmgateway", VM_NET, VMGW_NET1_IP))
    lab.until(
        lambda: envoyview.endpoints(webapp, cluster) == [f"{VMGW_NET1_IP}:15443"],
        30,
        "vm-net's gateway back in webapp's EDS",
    )
    lab.until(lambda: all(r.get("status") == 200 for r in _webapp_results(lab, 5)), 30, "webapp reaching the VM again")


def test_health_across_networks(lab: NetLab, multinet: MultiNetwork) -> None:
    """The data-plane lab's health scenario from vm-net: forum-v1 failing readiness leaves the VM's traffic to v2.

    The gateway's own EDS drops v1 at once, but it forwards connections, not requests: a connection the VM's Envoy
    already has through it keeps leading to v1. Istio's knob for per-request balancing through a passthrough
    gateway is a DestinationRule's ``maxRequestsPerConnection: 1``; the scenario runs with it, as an operator who
    wants health to act per request across networks would."""
    assert lab.cp is not None and multinet.ledger is not None
    ledger, v1, eastwest = multinet.ledger, lab.vms["forum-v1"], multinet.gateways["eastwest"]
    lab.cp.apply(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "forum", "namespace": "forum"},
            "spec": {
                "host": FORUM_HOST,
                "trafficPolicy": {"connectionPool": {"http": {"maxRequestsPerConnection": 1}}},
            },
        }
    )
    try:
        lab.until(lambda: len(lab.versions(ledger, FORUM_URL, 16) - {None}) == 2, 30, "per-request balancing")
        with RequestStream(ledger, FORUM_URL) as out:
            time.sleep(1.5)
            flipped = v1.app("set_ready", ready=False)["t"]
            lab.wait_healthy(v1, False, 30)
            lab.until(
                lambda: f"{v1.host.ip}:8080" not in envoyview.endpoints(eastwest, FORUM_SNI),
                30,
                "v1 out of the gateway's EDS",
            )
            lab.until(
                lambda: lab.versions(ledger, FORUM_URL, 16) == {"v2"}, 30, "the VM's requests to stop reaching v1"
            )
            v1.app("set_ready", ready=True)
            lab.wait_healthy(v1, True, 30)
            lab.until(lambda: "v1" in lab.versions(ledger, FORUM_URL, 16), 30, "the VM's requests to reach v1 again")
    finally:
        v1.app("set_ready", ready=True)
        remove_forum_routing(lab.cp)
    first_failure = min(t for t, code in v1.app("probes")["probes"] if code == 503 and t >= flipped)
    last_v1 = max(r["t1"] for r in out.records if r.get("version") == "v1" and r["t1"] < first_failure + 30)
    assert not out.failures(), out.failures()[:5]
    lab.figures.record("multinet_health_probe_fail_to_last_v1_request_s", round(last_v1 - first_failure, 2))
    lab.figures.record("multinet_health_stream", out.summary())


def test_traffic_shift_across_networks(lab: NetLab, multinet: MultiNetwork) -> None:
    """80/20 by subset from the VM on vm-net: the subset's SNI (outbound_.80_.v1_.forum...) picks the gateway's
    subset cluster."""
    assert lab.cp is not None and multinet.ledger is not None
    cp, ledger = lab.cp, multinet.ledger
    cp.apply(*forum_by_version(80, 20))
    try:
        subset_cluster = f"outbound|80|v1|{FORUM_HOST}"
        lab.until(
            lambda: envoyview.mtls_sni(ledger, subset_cluster) == f"outbound_.80_.v1_.{FORUM_HOST}",
            30,
            "v1 subset cluster on the VM",
        )
        lab.until(
            lambda: len(lab.versions(ledger, FORUM_URL, 40, concurrency=GATEWAY_CONCURRENCY) - {None}) == 2,
            30,
            "both subsets answering",
        )
        results = ledger.app("get", url=FORUM_URL, count=1000, concurrency=8, timeout=5)["results"]
        assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200][:5]
        share = 100.0 * sum(r["version"] == "v1" for r in results) / len(results)
        assert 75.0 <= share <= 85.0, share
        lab.figures.record("multinet_traffic_shift_80_20_v1_pct_of_1000", round(share, 1))
    finally:
        remove_forum_routing(cp)
    lab.wait_serving(ledger, FORUM_URL, {"v1", "v2"}, 30, concurrency=GATEWAY_CONCURRENCY)
