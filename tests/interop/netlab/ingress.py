"""An ingress gateway on a VM (`vm-agent run --gateway`) in front of the forum service, on network1.

    namespace   address      runs
    ingress     10.77.0.40   vm-agent --gateway + Envoy (uid 1337), labels istio=ingressgateway

istiod configures it from a Gateway (port 8080, HTTP, any host) and a VirtualService routing to forum.
"""

from __future__ import annotations

import time
from typing import Any

from tests.interop.lab import wait_until
from tests.interop.netlab.vm import Vm
from tests.interop.netlab.world import FORUM_HOST, NETWORK1, NetLab

INGRESS_PORT = 8080
INGRESS_NAME = "istio-ingressgateway"


def ingress_objects() -> list[dict[str, Any]]:
    labels = {"istio": "ingressgateway", "app": INGRESS_NAME}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": INGRESS_NAME, "namespace": "istio-system"}},
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadGroup",
            "metadata": {"name": INGRESS_NAME, "namespace": "istio-system"},
            "spec": {"metadata": {"labels": labels}, "template": {"serviceAccount": INGRESS_NAME, "network": NETWORK1}},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "forum-gateway", "namespace": "forum"},
            "spec": {
                "selector": {"istio": "ingressgateway"},
                "servers": [{"port": {"number": INGRESS_PORT, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "forum-ingress", "namespace": "forum"},
            "spec": {
                "hosts": ["*"],
                "gateways": ["forum-gateway"],
                "http": [{"route": [{"destination": {"host": FORUM_HOST, "port": {"number": 80}}}]}],
            },
        },
    ]


class IngressGateway:
    def __init__(self, lab: NetLab) -> None:
        self.lab = lab
        self.vm: Vm | None = None
        self.netfilter_output = ""

    def start(self) -> None:
        lab = self.lab
        cp = lab.cp
        assert cp is not None and lab.python is not None
        t0 = time.monotonic()
        host = lab.topo.host("ingress", {"lan": 40})
        cp.apply(*ingress_objects())
        wait_until(
            lambda: cp.istiod_has_config("WorkloadGroup", "istio-system", INGRESS_NAME),
            60,
            "istiod to see the ingress group",
        )
        files = lab.istioctl_files(INGRESS_NAME, "istio-system", host.ip, autoregister=False)
        host.write_etc("hosts", "127.0.0.1 localhost\n" + (files / "hosts").read_text())
        host.write_etc("resolv.conf", "nameserver 10.77.0.53\n")
        self.vm = Vm(host, work=lab.work, files=files, python=lab.python, gateway=True)
        # The shared unit's ExecStartPre: with the gateway role there is nothing to capture.
        res = self.vm.netfilter("apply")
        assert res.returncode == 0, res.stderr + res.stdout
        self.netfilter_output = res.stdout
        self.vm.start_agent()
        vm = self.vm

        def live() -> bool:
            vm.must_be_alive()
            return vm.local_get(15000, "/ready")[0] == 200

        lab.until(live, 90, "the ingress gateway's Envoy LIVE")
        lab.figures.record("ingress_gateway_start_s", round(time.monotonic() - t0, 1))

    def stop(self) -> None:
        if self.vm is not None:
            self.vm.stop()
