"""Scenarios 4 and 5: PeerAuthentication and AuthorizationPolicy from istiod, enforced by the VM's stock Envoy."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.interop.netlab.vm import HTTP_PORT
from tests.interop.netlab.world import FORUM_HOST, NetLab

pytestmark = [pytest.mark.interop]
URL = f"http://{FORUM_HOST}/"


def _peer_auth(mode: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "forum"},
        "spec": {"mtls": {"mode": mode}},
    }


def _plaintext_ok(lab: NetLab) -> bool:
    assert lab.outsider_app is not None
    v1 = lab.vms["forum-v1"]
    r = lab.outsider_app.app("get", url=f"http://{v1.host.ip}:{HTTP_PORT}/", count=1, timeout=3)["results"][0]
    return bool(r.get("status") == 200 and r.get("app") == "forum")


def _mesh_ok(lab: NetLab) -> bool:
    results = lab.vms["webapp"].app("get", url=URL, count=10, timeout=3)["results"]
    return all(r.get("status") == 200 for r in results)


def test_peer_authentication_strict_and_permissive(lab: NetLab) -> None:
    assert lab.cp is not None
    # No policy: Istio's default is PERMISSIVE, so a plain client reaches the VM's app through its Envoy.
    assert _plaintext_ok(lab)
    try:
        t0 = time.monotonic()
        lab.cp.apply(_peer_auth("STRICT"))
        lab.until(lambda: not _plaintext_ok(lab), 30, "STRICT to refuse the outsider's plaintext request")
        lab.figures.record("peer_auth_strict_apply_to_effect_s", round(time.monotonic() - t0, 2))
        assert _mesh_ok(lab), "webapp (mTLS) must keep working under STRICT"
        t1 = time.monotonic()
        lab.cp.apply(_peer_auth("PERMISSIVE"))
        lab.until(lambda: _plaintext_ok(lab), 30, "PERMISSIVE to accept the outsider's plaintext request")
        lab.figures.record("peer_auth_permissive_apply_to_effect_s", round(time.monotonic() - t1, 2))
        assert _mesh_ok(lab)
    finally:
        lab.cp.kubectl("-n", "forum", "delete", "peerauthentication", "default", "--ignore-not-found")


def test_authorization_policy_deny_by_service_account(lab: NetLab) -> None:
    assert lab.cp is not None
    webapp = lab.vms["webapp"]
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-webapp", "namespace": "forum"},
        "spec": {
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/webapp/sa/webapp"]}}]}],
        },
    }
    try:
        t0 = time.monotonic()
        lab.cp.apply(policy)

        def denied() -> bool:
            results = webapp.app("get", url=URL, count=10, timeout=3)["results"]
            return all(r.get("status") == 403 for r in results)

        lab.until(denied, 30, "the DENY policy to answer 403 on both forum VMs")
        lab.figures.record("authz_deny_apply_to_effect_s", round(time.monotonic() - t0, 2))
        r = webapp.app("get", url=URL, count=1)["results"][0]
        assert r["status"] == 403 and r.get("body") == "RBAC: access denied", r
        # The policy names webapp's identity only: a plain client is not denied by it.
        assert _plaintext_ok(lab)
    finally:
        t1 = time.monotonic()
        lab.cp.kubectl("-n", "forum", "delete", "authorizationpolicy", "deny-webapp", "--ignore-not-found")
    lab.until(lambda: _mesh_ok(lab), 30, "requests to pass again once the policy is removed")
    lab.figures.record("authz_remove_to_effect_s", round(time.monotonic() - t1, 2))
