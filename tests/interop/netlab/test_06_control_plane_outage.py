"""Scenario 9: the control plane gone for a minute - istiod stopped, then the VMs' link to it cut.

Requests between VMs and DNS lookups must not notice; a change made meanwhile must reach the VMs afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from tests.interop.netlab.world import FORUM_HOST, OUTSIDE_NAME, NetLab, RequestStream

pytestmark = [pytest.mark.interop]
URL = f"http://{FORUM_HOST}/"
OUTAGE_S = 60.0


def _service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "forum"},
        "spec": {"selector": {"app": "forum"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


@contextmanager
def _traffic(lab: NetLab) -> Iterator[list[RequestStream]]:
    webapp = lab.vms["webapp"]
    streams = [
        RequestStream(webapp, URL, interval=0.05),
        RequestStream(webapp, "forum.forum", kind="dns", interval=0.1),
        RequestStream(webapp, OUTSIDE_NAME, kind="dns", interval=0.2),
    ]
    with ExitStack() as stack:
        for s in streams:
            stack.enter_context(s)
        yield streams


def _all_upstreams_connected(lab: NetLab) -> bool:
    for vm in lab.vms.values():
        st = vm.status()
        if st is None or st["xds"]["upstream"]["state"] != "connected":
            return False
    return True


def _stream_totals(lab: NetLab) -> dict[str, int]:
    out = {}
    for name, vm in lab.vms.items():
        st = vm.status()
        assert st is not None
        out[name] = int(st["xds"]["streams"]["total"])
    return out


def _outage(lab: NetLab, key: str, cut: Callable[[], None], restore: Callable[[], None], new_service: str) -> None:
    assert lab.cp is not None
    webapp = lab.vms["webapp"]
    name = f"{new_service}.forum.svc.cluster.local"
    before = _stream_totals(lab)
    try:
        with _traffic(lab) as streams:
            time.sleep(1)
            t_cut = time.monotonic()
            cut()
            time.sleep(5)
            lab.cp.apply(_service(new_service))  # the kube-apiserver is still there: a change istiod must deliver later
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_cut)))
            restore()
            t_back, wall_back = time.monotonic(), time.time()
            lab.until(
                lambda: _all_upstreams_connected(lab), 120, "every VM's agent connected to istiod again", interval=0.5
            )
            reconnect_s = time.monotonic() - t_back
            lab.until(
                lambda: "addresses" in webapp.app("resolve", name=name),
                120,
                f"{name} in webapp's NameTable",
                interval=0.5,
            )
            change_s = time.monotonic() - t_back
            time.sleep(1)
        for s in streams:
            bad = s.failures()
            when = [round(r["t0"] - wall_back, 2) for r in bad]
            assert not bad, (
                s.args,
                f"{len(bad)} failed, from {min(when)} s to {max(when)} s after the restore",
                bad[:3],
            )
        # How many xDS streams each VM had to open again (0: its stream to istiod outlived the outage).
        after = _stream_totals(lab)
        lab.figures.record(f"{key}_new_xds_streams", {vm: after[vm] - before[vm] for vm in before})
        lab.figures.record(f"{key}_reconnect_s", round(reconnect_s, 1))
        lab.figures.record(f"{key}_change_delivered_s", round(change_s, 1))
        lab.figures.record(f"{key}_streams", [s.summary() for s in streams])
        for vm in lab.vms.values():
            vm.must_be_alive()
    finally:
        lab.cp.kubectl("-n", "forum", "delete", "service", new_service, "--ignore-not-found")


def test_istiod_stopped_for_a_minute(lab: NetLab) -> None:
    cp = lab.cp
    assert cp is not None and cp.istiod is not None
    _outage(lab, "istiod_stopped_60s", cut=cp.istiod.stop, restore=cp.start_istiod, new_service="forum-canary")
    for vm in lab.vms.values():
        lab.wait_healthy(vm, True, 60)


def test_link_to_the_control_plane_cut_for_a_minute(lab: NetLab) -> None:
    cluster = lab.topo.hosts["cluster"]
    try:
        _outage(
            lab,
            "link_cut_60s",
            cut=lambda: lab.topo.set_link(cluster, "lan", up=False),
            restore=lambda: lab.topo.set_link(cluster, "lan", up=True),
            new_service="forum-during-cut",
        )
    finally:
        lab.topo.set_link(cluster, "lan", up=True)
    for vm in lab.vms.values():
        lab.wait_healthy(vm, True, 60)
