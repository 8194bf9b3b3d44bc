"""The second network of the lab (the multi-network issue): a VM on ``vm-net`` that cannot route to ``network1``.

    namespace   network1 (10.77.0.0/24)   vm-net (10.88.0.0/24)   runs
    eastwest    10.77.0.5                 10.88.0.5               `vm-agent run --gateway`: network1's east-west gateway
                                                                  (15443 AUTO_PASSTHROUGH, 15012/15017 to istiod)
    vmgw        10.77.0.6                 10.88.0.6               `vm-agent run --gateway`: vm-net's east-west gateway
    ledger      -                         10.88.0.21              vm-agent + Envoy + the ledger app: WorkloadGroup
                                                                  ledger/ledger on network vm-net
    dns         10.77.0.53                10.88.0.53              dnsmasq on both networks

No host forwards packets between its legs; the only way across is through a gateway's Envoy. istiod learns each
network's gateway as Istio's multi-network guide has it: a Service labelled ``topology.istio.io/network`` with a
15443 port, whose external address is the one the *other* network reaches the gateway on.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from tests.interop.lab import wait_until
from tests.interop.netlab.vm import Vm
from tests.interop.netlab.world import FORUM_HOST, NETWORK1, NetLab, group_objects

VM_NET = "vm-net"
VM_NET_CIDR = "10.88.0.0/24"
EASTWEST_NET1_IP, EASTWEST_VMNET_IP = "10.77.0.5", "10.88.0.5"
VMGW_NET1_IP, VMGW_VMNET_IP = "10.77.0.6", "10.88.0.6"
LEDGER_IP = "10.88.0.21"
VMNET_DNS_IP = "10.88.0.53"
LEDGER_HOST = "ledger.ledger.svc.cluster.local"
ISTIOD_IP = "10.77.0.2"
GATEWAY_CONCURRENCY = 8
"""Requests in parallel when a test wants several versions through the gateway: it balances per connection."""


def gateway_objects(name: str, label: str, network: str, external_ip: str) -> list[dict[str, Any]]:
    """The WorkloadGroup a gateway VM's istioctl files come from, its ServiceAccount, and the Service that tells
    istiod where ``network``'s gateway is (istiod reads the network label, the 15443 port and the external IP)."""
    labels = {"istio": label, "app": name, "topology.istio.io/network": network}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": "istio-system"}},
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadGroup",
            "metadata": {"name": name, "namespace": "istio-system"},
            "spec": {"metadata": {"labels": labels}, "template": {"serviceAccount": name, "network": network}},
        },
        gateway_service(name, label, network, external_ip),
    ]


def gateway_service(name: str, label: str, network: str, external_ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "istio-system",
            "labels": {"istio": label, "app": name, "topology.istio.io/network": network},
        },
        "spec": {
            "selector": {"istio": label},
            "externalIPs": [external_ip],
            "ports": [
                {"name": "status-port", "port": 15021},
                {"name": "tls", "port": 15443},
                {"name": "tls-istiod", "port": 15012},
                {"name": "tls-webhook", "port": 15017},
            ],
        },
    }


def istio_manifests() -> list[dict[str, Any]]:
    """Istio's samples/multicluster expose-istiod.yaml and expose-services.yaml (namespace istio-system), plus the
    same cross-network Gateway for vm-net's gateway, and istiod's Service (istiod runs outside any pod here, so its
    EndpointSlice is written by hand)."""
    tls_passthrough = {"mode": "PASSTHROUGH"}
    return [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "istiod-gateway", "namespace": "istio-system"},
            "spec": {
                "selector": {"istio": "eastwestgateway"},
                "servers": [
                    {"port": {"name": "tls-istiod", "number": 15012, "protocol": "tls"}, "tls": tls_passthrough, "hosts": ["*"]},
                    {"port": {"name": "tls-istiodwebhook", "number": 15017, "protocol": "tls"}, "tls": tls_passthrough, "hosts": ["*"]},
                ],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "istiod-vs", "namespace": "istio-system"},
            "spec": {
                "hosts": ["*"],
                "gateways": ["istiod-gateway"],
                "tls": [
                    {
                        "match": [{"port": 15012, "sniHosts": ["*"]}],
                        "route": [{"destination": {"host": "istiod.istio-system.svc.cluster.local", "port": {"number": 15012}}}],
                    },
                    {
                        "match": [{"port": 15017, "sniHosts": ["*"]}],
                        "route": [{"destination": {"host": "istiod.istio-system.svc.cluster.local", "port": {"number": 443}}}],
                    },
                ],
            },
        },
        *(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "Gateway",
                "metadata": {"name": name, "namespace": "istio-system"},
                "spec": {
                    "selector": {"istio": label},
                    "servers": [
                        {
                            "port": {"number": 15443, "name": "tls", "protocol": "TLS"},
                            "tls": {"mode": "AUTO_PASSTHROUGH"},
                            "hosts": ["*.local"],
                        }
                    ],
                },
            }
            for name, label in (("cross-network-gateway", "eastwestgateway"), ("vm-net-cross-network-gateway", "vmgateway"))
        ),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "istiod", "namespace": "istio-system", "labels": {"app": "istiod"}},
            "spec": {
                "ports": [
                    {"name": "https-dns", "port": 15012},
                    {"name": "https-webhook", "port": 443, "targetPort": 15017},
                ]
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "istiod-lab",
                "namespace": "istio-system",
                "labels": {"kubernetes.io/service-name": "istiod", "endpointslice.kubernetes.io/managed-by": "vm-agent-lab"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ISTIOD_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "https-dns", "port": 15012, "protocol": "TCP"}, {"name": "https-webhook", "port": 15017, "protocol": "TCP"}],
        },
    ]  # fmt: skip


class MultiNetwork:
    """Adds vm-net, the two gateways and the ledger VM to a running single-network lab."""

    def __init__(self, lab: NetLab) -> None:
        self.lab = lab
        self.gateways: dict[str, Vm] = {}
        self.ledger: Vm | None = None

    def start(self) -> None:
        lab, topo = self.lab, self.lab.topo
        cp = lab.cp
        assert cp is not None and lab.python is not None
        t0 = time.monotonic()
        topo.network("vmnet", VM_NET_CIDR)
        topo.attach(topo.hosts["dns"], "vmnet", 53)
        lab.start_dnsmasq(topo.hosts["dns"], VMNET_DNS_IP)
        eastwest = topo.host("eastwest", {"lan": 5, "vmnet": 5})
        vmgw = topo.host("vmgw", {"vmnet": 6, "lan": 6})
        ledger = topo.host("ledger", {"vmnet": 21})
        cp.apply(
            *istio_manifests(),
            *gateway_objects("istio-eastwestgateway", "eastwestgateway", NETWORK1, EASTWEST_VMNET_IP),
            *gateway_objects("istio-vmgateway", "vmgateway", VM_NET, VMGW_NET1_IP),
            *group_objects("ledger", "ledger", "ledger", app_label="ledger", network=VM_NET),
        )
        for ns, group in (
            ("istio-system", "istio-eastwestgateway"),
            ("istio-system", "istio-vmgateway"),
            ("ledger", "ledger"),
        ):
            wait_until(
                lambda ns=ns, g=group: cp.istiod_has_config("WorkloadGroup", ns, g), 60, f"istiod to see {ns}/{group}"
            )
        wait_until(lambda: cp.get("configmap", "ledger", "istio-ca-root-cert") is not None, 60, "root cert in ledger")
        # The gateways reach istiod on network1 directly; the ledger VM only through network1's gateway, as the VM
        # guide's multi-network step has it (istioctl --ingressIP <east-west gateway>).
        gw_env = {"ISTIO_META_ROUTER_MODE": "sni-dnat"}
        for role, host, group, view in (
            ("eastwest", eastwest, "istio-eastwestgateway", NETWORK1),
            ("vmgw", vmgw, "istio-vmgateway", VM_NET),
        ):
            files = lab.istioctl_files(
                group, "istio-system", host.addresses["vmnet" if role == "vmgw" else "lan"], autoregister=False
            )
            host.write_etc("hosts", "127.0.0.1 localhost\n" + (files / "hosts").read_text())
            host.write_etc("resolv.conf", f"nameserver {VMNET_DNS_IP if role == 'vmgw' else '10.77.0.53'}\n")
            self.gateways[role] = Vm(
                host, work=lab.work, files=files, python=lab.python, gateway=True,
                extra_env={**gw_env, "ISTIO_META_REQUESTED_NETWORK_VIEW": view},
            )  # fmt: skip
        ledger_files = lab.istioctl_files("ledger", "ledger", LEDGER_IP, ingress_ip=EASTWEST_VMNET_IP)
        ledger.write_etc("hosts", "127.0.0.1 localhost\n" + (ledger_files / "hosts").read_text())
        ledger.write_etc("resolv.conf", f"nameserver {VMNET_DNS_IP}\n")
        self.ledger = Vm(ledger, work=lab.work, files=ledger_files, python=lab.python, app_name="ledger")
        for vm in (*self.gateways.values(), self.ledger):
            res = vm.netfilter("apply")
            assert res.returncode == 0, res.stderr + res.stdout
        for gw in self.gateways.values():
            gw.start_agent()
        self.ledger.start_agent()
        self.ledger.start_app()
        lab.vms["ledger"] = self.ledger
        for gw in self.gateways.values():
            lab.until(functools.partial(_live, gw), 90, f"{gw.name}'s Envoy LIVE")
        lab.wait_healthy(self.ledger, True, 120)
        lab.wait_serving(self.ledger, f"http://{FORUM_HOST}/", {"v1", "v2"}, 120, concurrency=GATEWAY_CONCURRENCY)
        lab.figures.record("multinet_start_s", round(time.monotonic() - t0, 1))

    def stop(self) -> None:
        for vm in (*self.gateways.values(), *([self.ledger] if self.ledger else [])):
            vm.stop()


def _live(vm: Vm) -> bool:
    vm.must_be_alive()
    return vm.local_get(15000, "/ready")[0] == 200
