"""Scenarios 7 and 8: leaving the mesh under load, and Envoy killed under load."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.interop.lab import GRACE_PERIOD_S, healthy_condition
from tests.interop.netlab.vm import Vm
from tests.interop.netlab.world import FORUM_HOST, NetLab, RequestStream

pytestmark = [pytest.mark.interop]
URL = f"http://{FORUM_HOST}/"


def _rules(vm: Vm) -> str:
    ipt = vm.host.run("iptables-save", check=False).stdout
    nft = vm.host.run("nft", "list", "ruleset", check=False).stdout
    return ipt + nft


def test_sigterm_leaves_the_mesh_without_failing_a_request(lab: NetLab) -> None:
    v2, webapp = lab.vms["forum-v2"], lab.vms["webapp"]
    assert "VMAGENT" in _rules(v2) or "vm_agent" in _rules(v2), "capture rules are in place before the test"
    with RequestStream(webapp, URL) as out:
        time.sleep(2)
        t0 = time.monotonic()
        code = v2.stop_agent(signal.SIGTERM, timeout=60)
        stop_s = time.monotonic() - t0
        time.sleep(2)
    assert code == 0, v2.agent_tail()
    assert not out.failures(), out.failures()[:5]
    assert any(r.get("version") == "v2" for r in out.records), "v2 served part of the stream before it left"
    lab.figures.record("leave_sigterm_stream", out.summary())
    lab.figures.record("leave_sigterm_to_exit_s", round(stop_s, 2))
    assert v2.envoy_pid() is None, "no Envoy is left in the VM"

    # The unit's ExecStopPost removes the capture rules.
    res = v2.netfilter("cleanup")
    assert res.returncode == 0, res.stderr
    leftover = _rules(v2)
    assert "VMAGENT" not in leftover and "vm_agent" not in leftover, leftover

    # istiod: first marked disconnected (health False was reported before the drain), then deleted after the grace.
    entry = lab.entry(v2)
    if entry is not None:
        cond = healthy_condition(entry)
        assert cond is not None and cond["status"] == "False", entry
    t1 = time.monotonic()
    lab.until(lambda: lab.entry(v2) is None, GRACE_PERIOD_S + 30, "istiod to delete forum-v2's WorkloadEntry")
    lab.figures.record("leave_entry_deleted_after_s", round(time.monotonic() - t1, 1))

    # Back in: the same steps as at boot.
    assert v2.netfilter("apply").returncode == 0
    v2.start_agent()
    lab.wait_healthy(v2, True, 90)
    lab.wait_serving(webapp, URL, {"v1", "v2"}, 60)


def test_envoy_killed_is_restarted_in_place(lab: NetLab) -> None:
    v1, webapp = lab.vms["forum-v1"], lab.vms["webapp"]
    before = v1.status()
    assert before is not None
    with RequestStream(webapp, URL) as out, RequestStream(v1, "forum.forum", kind="dns", interval=0.05) as dns:
        time.sleep(1.5)
        pid = v1.envoy_pid()
        assert pid is not None
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        lab.until(
            lambda: (p := v1.envoy_pid()) is not None and p != pid and v1.local_get(15000, "/ready")[0] == 200,
            30,
            "Envoy LIVE again",
        )
        live_at = time.time()
        time.sleep(2)
    v1.must_be_alive()
    lab.figures.record("envoy_kill_restart_to_live_s", round(live_at - killed_at, 2))
    failed = out.failures()
    lab.figures.record("envoy_kill_stream", out.summary())
    if failed:
        window = max(r["t1"] for r in failed) - min(r["t0"] for r in failed)
        lab.figures.record("envoy_kill_failure_window_s", round(window, 2))
        assert window <= live_at - killed_at + 1.0, (window, failed[:5])
    # Identity and DNS stayed up: every lookup in v1 answered; the agent kept its certificate.
    assert not dns.failures(), dns.failures()[:5]
    after = v1.status()
    assert after is not None
    # The same certificate before and after: Envoy's restart never touched the identity.
    assert after["identity"]["valid_now"] and after["identity"]["not_after"] == before["identity"]["not_after"]
    code, certs = v1.local_get(15000, "/certs")
    assert code == 200 and b"spiffe://cluster.local/ns/forum/sa/forum" in certs
    lab.wait_serving(webapp, URL, {"v1", "v2"}, 60)
