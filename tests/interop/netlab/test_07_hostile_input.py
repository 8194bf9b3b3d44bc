"""Scenario 10: garbage and oversized input from a host outside the mesh; what the VM exposes to it."""

from __future__ import annotations

import base64
import os
import re
import time

import pytest

from tests.interop.netlab.vm import HTTP_PORT, PROXY_UID, TCP_PORT
from tests.interop.netlab.world import FORUM_HOST, NetLab, RequestStream

pytestmark = [pytest.mark.interop]
URL = f"http://{FORUM_HOST}/"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_garbage_from_outside_does_not_hurt_mesh_traffic(lab: NetLab) -> None:
    assert lab.outsider_app is not None
    outsider, v1, webapp = lab.outsider_app, lab.vms["forum-v1"], lab.vms["webapp"]
    target = v1.host.ip
    payloads = {
        "random": os.urandom(64 * 1024),
        "http-huge-header": b"GET / HTTP/1.1\r\nHost: forum\r\nX-Big: " + b"a" * (2 << 20) + b"\r\n\r\n",
        "http-huge-line": b"GET /" + b"b" * (256 << 10) + b" HTTP/1.1\r\nHost: forum\r\n\r\n",
        "http-bad-version": b"GET / HTTP/9.9\r\n\r\n",
        "tls-garbage": b"\x16\x03\x01\x02\x00" + os.urandom(512),
        "h2-preface-then-junk": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(4096),
    }
    replies: dict[str, str] = {}
    with RequestStream(webapp, URL, interval=0.02) as out:
        for _round in range(3):
            for name, data in payloads.items():
                for port in (HTTP_PORT, TCP_PORT, 15001, 15006, 15021):
                    r = outsider.app("send_raw", host=target, port=port, data=_b64(data), timeout=3)
                    replies[f"{name}@{port}"] = r.get("error") or base64.b64decode(r.get("reply", ""))[:40].decode(
                        errors="replace"
                    )
            for port in (53, 15053):
                outsider.app("send_raw", host=target, port=port, data=_b64(os.urandom(300)), udp=True, timeout=1)
                outsider.app("send_raw", host=target, port=port, data=_b64(b"\x00\x10" + os.urandom(16)), timeout=1)
        time.sleep(1)
    assert not out.failures(), out.failures()[:5]
    lab.figures.record("hostile_input_stream", out.summary())
    # Envoy answered the oversized HTTP with an error of its own rather than passing it to the app.
    assert (
        re.match(r"HTTP/1\.1 4\d\d", replies[f"http-huge-header@{HTTP_PORT}"])
        or "Error" in replies[f"http-huge-header@{HTTP_PORT}"]
    ), replies
    v1.must_be_alive()
    assert v1.envoy_pid() is not None


ENVOY_PUBLIC_PORTS = {"15001", "15006", "15021", "15090"}
"""Envoy's outbound and inbound capture ports, its readiness and its Prometheus port: on every address, as in Istio."""


def _proxy_user_listeners(lab: NetLab, role: str) -> list[tuple[str, str, str]]:
    """(protocol, local address, port) of every socket the proxy user (agent and Envoy) listens on in a VM."""
    out = lab.vms[role].host.run("ss", "-H", "-lntupe", check=False).stdout
    rows = []
    for line in out.splitlines():
        if f"uid:{PROXY_UID}" not in line:
            continue
        parts = line.split()
        addr, _, port = parts[4].rpartition(":")
        rows.append((parts[0], addr, port))
    return rows


def test_admin_status_and_sds_are_not_reachable_from_outside(lab: NetLab) -> None:
    assert lab.outsider_app is not None
    outsider, v1 = lab.outsider_app, lab.vms["forum-v1"]
    # Status server (15020) is excluded from capture and listens on loopback only: refused from outside.
    status = outsider.app("connect", host=v1.host.ip, port=15020)
    assert not status["ok"], status
    # Envoy's admin API (15000) listens on loopback; from outside, capture sends the connection to Envoy's inbound
    # listener, which can only pass it on to the VM's address, where nothing listens: no admin answer comes back.
    r = outsider.app(
        "send_raw", host=v1.host.ip, port=15000, data=_b64(b"GET /server_info HTTP/1.0\r\n\r\n"), timeout=3
    )
    reply = base64.b64decode(r.get("reply", ""))
    assert b"hot_restart_version" not in reply and b'"state"' not in reply, reply[:200]
    # Every other socket of the proxy user (the agent's status, DNS and Envoy's admin) is on loopback; the SDS and
    # xDS sockets are Unix sockets.
    rows = _proxy_user_listeners(lab, "forum-v1")
    assert {port for _, _, port in rows} >= {"15000", "15020", "15053"} | ENVOY_PUBLIC_PORTS, rows
    for proto, addr, port in rows:
        if port not in ENVOY_PUBLIC_PORTS:
            assert addr in ("127.0.0.1", "[::1]", "::1"), (proto, addr, port)
    sds = v1.run_dir / "sds.sock"
    st = sds.stat()
    assert st.st_uid == 1337 and (st.st_mode & 0o007) == 0, oct(st.st_mode)
