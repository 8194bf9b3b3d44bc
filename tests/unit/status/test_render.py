"""`vm-agent status` text from a /debug/status document shaped like the real services' snapshots."""

from __future__ import annotations

import time
from typing import Any

from vm_agent.status.client import render
from vm_agent.status.server import is_loopback_address


def doc(ready: bool = True) -> dict[str, Any]:
    now = time.time()
    return {
        "ready": {"ready": ready, "reason": None if ready else "workers have not yet started"},
        "identity": {
            "spiffe_id": "spiffe://cluster.local/ns/ns1/sa/vm",
            "not_after": "2026-11-26T21:00:00Z",
            "next_rotation": "2026-11-26T09:00:00Z",
            "rotations": 3,
            "failures": 1,
            "last_error": "CA unreachable",
        },
        "envoy": {
            "state": "backoff",
            "pid": None,
            "restarts": 4,
            "last_exit_reason": "killed by signal SIGKILL (possibly out of memory)",
            "restart_in_s": 3.5,
            "uptime_s": None,
        },
        "xds": {
            "upstream": {"address": "istiod.istio-system.svc:15012", "state": "connected"},
            "types": {
                "type.googleapis.com/envoy.config.cluster.v3.Cluster": {
                    "responses": 2,
                    "acks": 2,
                    "nacks": 0,
                    "last_response_at": now - 5,
                    "last_ack_at": now - 4,
                }
            },
        },
        "health": {"state": "unhealthy", "reported_message": "HTTP probe: 503", "transitions": 2},
        "dns": {"table_entries": 17, "upstreams": [{"address": "10.0.0.2:53", "failures": 0}]},
    }


def test_render_names_what_a_person_acts_on() -> None:
    text = render(doc(ready=False))
    assert "workers have not yet started" in text
    assert "spiffe://cluster.local/ns/ns1/sa/vm" in text
    assert "2026-11-26T21:00:00Z" in text
    assert "CA unreachable" in text
    assert "restarts" in text and " 4" in text
    assert "SIGKILL" in text
    assert "next restart in" in text
    assert "istiod.istio-system.svc:15012 connected" in text
    assert "Cluster" in text and "last ACK 4s ago" in text
    assert "HTTP probe: 503" in text
    assert "17" in text


def test_render_without_optional_services() -> None:
    d = doc()
    del d["health"], d["dns"]
    text = render(d)
    assert "ready: yes" in text
    assert "none configured" in text
    assert "off" in text


def test_loopback_detection() -> None:
    assert is_loopback_address("127.0.0.1")
    assert is_loopback_address("127.8.9.10")
    assert is_loopback_address("::1")
    assert is_loopback_address("::ffff:127.0.0.1")
    assert not is_loopback_address("::ffff:10.0.0.1")
    assert not is_loopback_address("10.0.0.1")
    assert not is_loopback_address("fe80::1%eth0")
    assert not is_loopback_address("not an address")
