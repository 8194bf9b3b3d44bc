"""The gateway role on its own: an ingress gateway run by `vm-agent run --gateway`, configured by istiod."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest

from tests.interop.netlab.ingress import INGRESS_PORT, IngressGateway
from tests.interop.netlab.world import NetLab

pytestmark = [pytest.mark.interop]


def test_a_plain_client_reaches_the_mesh_through_the_ingress_gateway(lab: NetLab, ingress: IngressGateway) -> None:
    assert ingress.vm is not None and lab.outsider_app is not None
    gw, outsider = ingress.vm, lab.outsider_app
    # What the role means on this VM: a router node, no capture rules, no DNS proxy, no probe.
    assert "capture is off (role gateway)" in ingress.netfilter_output
    rules = gw.host.run("iptables-save", check=False).stdout + gw.host.run("nft", "list", "ruleset", check=False).stdout
    assert "VMAGENT" not in rules and "vm_agent" not in rules
    status = gw.status()
    assert status is not None
    assert status["agent"]["role"] == "gateway" and status["agent"]["node_id"].startswith("router~")
    assert "dns" not in status and "health" not in status
    assert gw.local_get(15000, "/listeners")[1].decode().count(f"0.0.0.0:{INGRESS_PORT}") == 1

    url = f"http://{gw.host.ip}:{INGRESS_PORT}/"
    lab.until(
        lambda: lab.versions(outsider, url, 10) == {"v1", "v2"}, 60, "the outsider reaching forum through the ingress"
    )
    results = outsider.app("get", url=url, count=20)["results"]
    assert all(r["status"] == 200 and r["app"] == "forum" for r in results), results[:3]
    # The gateway called forum over mTLS with its own SVID.
    xfcc = results[0]["headers"]["x-forwarded-client-cert"]
    assert "URI=spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway" in xfcc, xfcc


def test_sigterm_drains_the_gateway_and_serves_in_flight_requests(lab: NetLab, ingress: IngressGateway) -> None:
    assert ingress.vm is not None and lab.outsider_app is not None
    gw, outsider = ingress.vm, lab.outsider_app
    slow = f"http://{gw.host.ip}:{INGRESS_PORT}/slow?ms=3000"
    in_flight: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: in_flight.extend(outsider.app("get", url=slow, count=1, timeout=20)["results"]))
    t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    code = gw.stop_agent(signal.SIGTERM, timeout=60)
    stop_s = time.monotonic() - t0
    t.join(30)
    assert code == 0, gw.agent_tail()
    assert in_flight and in_flight[0]["status"] == 200 and in_flight[0]["app"] == "forum", in_flight
    lab.figures.record("ingress_sigterm_to_exit_s", round(stop_s, 2))
    # Gone afterwards: nothing listens on the gateway port, no Envoy is left.
    after = outsider.app("connect", host=gw.host.ip, port=INGRESS_PORT, timeout=2)
    assert not after["ok"], after
    assert gw.envoy_pid() is None
