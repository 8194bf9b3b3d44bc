"""Scenario 3: the readiness probe drives the endpoints other VMs call."""

from __future__ import annotations

import time

import pytest

from tests.interop.netlab.world import FORUM_HOST, NetLab, RequestStream

pytestmark = [pytest.mark.interop]
URL = f"http://{FORUM_HOST}/"


def test_failing_readiness_takes_v1_out_and_recovery_brings_it_back(lab: NetLab) -> None:
    v1 = lab.vms["forum-v1"]
    try:
        _out_and_back(lab)
    finally:
        v1.app("set_ready", ready=True)  # later scenarios need v1 serving, also when this one failed


def _out_and_back(lab: NetLab) -> None:
    v1, webapp = lab.vms["forum-v1"], lab.vms["webapp"]
    with RequestStream(webapp, URL) as out:
        time.sleep(2)
        flipped_at = v1.app("set_ready", ready=False)["t"]
        lab.wait_healthy(v1, False, 30)
        # Requests must stop reaching v1 once istiod has pushed the change: keep streaming long enough to see it.
        lab.until(lambda: lab.versions(webapp, URL, 20) == {"v2"}, 30, "webapp's requests to stop reaching forum-v1")
    probes = v1.app("probes")["probes"]
    first_failure = min(t for t, code in probes if code == 503 and t >= flipped_at)
    served_by_v1 = [r["t1"] for r in out.records if r.get("version") == "v1"]
    last_v1 = max(served_by_v1)
    after = [r for r in out.records if r["t0"] > last_v1]
    assert after and all(r.get("version") == "v2" for r in after), "requests after the last v1 answer all went to v2"
    assert not out.failures(), out.failures()[:5]
    lab.figures.record("health_probe_fail_to_last_v1_request_s", round(last_v1 - first_failure, 2))
    lab.figures.record("health_out_stream", out.summary())

    with RequestStream(webapp, URL) as back:
        time.sleep(1)
        restored_at = v1.app("set_ready", ready=True)["t"]
        lab.wait_healthy(v1, True, 30)
        lab.until(lambda: "v1" in lab.versions(webapp, URL, 10), 30, "webapp's requests to reach forum-v1 again")
    first_ok = min(t for t, code in v1.app("probes")["probes"] if code == 200 and t >= restored_at)
    first_v1 = min(r["t0"] for r in back.records if r.get("version") == "v1")
    assert not back.failures(), back.failures()[:5]
    lab.figures.record("health_probe_ok_to_first_v1_request_s", round(first_v1 - first_ok, 2))
