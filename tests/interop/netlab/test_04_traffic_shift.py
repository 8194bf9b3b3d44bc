"""Scenario 6: the VM guide's VM-to-VM migration - subsets by version, 80/20, then 0/100."""

from __future__ import annotations

import time

import pytest

from tests.interop.netlab.world import FORUM_HOST, NetLab, forum_by_version, remove_forum_routing

pytestmark = [pytest.mark.interop]
URL = f"http://{FORUM_HOST}/"


def _route_weights(lab: NetLab) -> dict[str, int]:
    """The weights webapp's Envoy actually holds for forum's port 80 route."""
    import json

    code, body = lab.vms["webapp"].local_get(15000, "/config_dump?resource=dynamic_route_configs")
    if code != 200:
        return {}
    weights: dict[str, int] = {}
    for cfg in json.loads(body).get("configs", []):
        for vh in cfg.get("route_config", {}).get("virtual_hosts", []):
            if FORUM_HOST not in vh.get("domains", []):
                continue
            for route in vh.get("routes", []):
                for wc in route.get("route", {}).get("weighted_clusters", {}).get("clusters", []):
                    subset = wc["name"].split("|")[2]
                    weights[subset] = int(wc.get("weight", 0))
    return weights


def test_weighted_shift_then_full_cutover(lab: NetLab) -> None:
    assert lab.cp is not None
    cp = lab.cp
    for vm, version in (("forum-v1", "v1"), ("forum-v2", "v2")):
        entry = lab.entry(lab.vms[vm])
        assert entry is not None and entry["spec"]["labels"].get("version") == version, entry
    cp.apply(*forum_by_version(80, 20))
    webapp = lab.vms["webapp"]
    try:
        lab.until(lambda: _route_weights(lab) == {"v1": 80, "v2": 20}, 30, "webapp's Envoy to hold the 80/20 route")
        results = webapp.app("get", url=URL, count=1000, concurrency=8, timeout=5)["results"]
        assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200][:5]
        v1_share = 100.0 * sum(r["version"] == "v1" for r in results) / len(results)
        assert 75.0 <= v1_share <= 85.0, v1_share
        lab.figures.record("traffic_shift_80_20_v1_pct_of_1000", round(v1_share, 1))

        t0 = time.monotonic()
        cp.apply(*forum_by_version(0, 100))
        lab.until(lambda: _route_weights(lab).get("v1", 0) == 0, 30, "webapp's Envoy to hold the 0/100 route")
        config_s = time.monotonic() - t0

        def only_v2() -> bool:
            batch = webapp.app("get", url=URL, count=20, timeout=3)["results"]
            return all(r.get("version") == "v2" for r in batch)

        lab.until(only_v2, 30, "requests to stop reaching v1")
        lab.figures.record("traffic_shift_0_100_apply_to_envoy_s", round(config_s, 2))
        lab.figures.record("traffic_shift_0_100_apply_to_requests_s", round(time.monotonic() - t0, 2))
        after = webapp.app("get", url=URL, count=1000, concurrency=8, timeout=5)["results"]
        assert all(r["status"] == 200 and r["version"] == "v2" for r in after), [
            r for r in after if r.get("version") != "v2"
        ][:5]
    finally:
        remove_forum_routing(cp)
    lab.wait_serving(webapp, URL, {"v1", "v2"}, 30)
