"""Under Istio-style capture in a private netns, probes with the bypass source reach the app, not Envoy's 15006.

The rules mirror istio-iptables' ISTIO_OUTPUT chain (§11.2) with uid 0 standing in for the proxy uid.
Without the bypass source a TCP probe to the instance IP is redirected to 15006 and "succeeds" while the
app is down (the problem "Further notes" 1 predicts); from 127.0.0.6 it reaches the app.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.integration]

INSTANCE_IP = "10.250.0.5"
APP_PORT = 8080
ROOT = Path(__file__).resolve().parents[3]

RULES = [
    "-N ISTIO_IN_REDIRECT",
    "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-N ISTIO_OUTPUT",
    "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
    "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 0 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 0 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --uid-owner 0 -j RETURN",
]

# Runs inside the namespace: a stand-in for Envoy's inbound listener on 15006, the app coming and going.
SCRIPT = f"""
import asyncio, json
from vm_agent.config.probe import HttpGetAction, TcpSocketAction
from vm_agent.health import probe_once

async def main():
    peers = {{"envoy": [], "app": []}}
    async def fake_envoy(reader, writer):
        peers["envoy"].append(writer.get_extra_info("peername")[0])
        writer.close()
    async def http_app(reader, writer):
        peers["app"].append(writer.get_extra_info("peername")[0])
        await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 0\\r\\nconnection: close\\r\\n\\r\\n")
        await writer.drain()
        writer.close()
    envoy = await asyncio.start_server(fake_envoy, "0.0.0.0", 15006)
    tcp = TcpSocketAction(port={APP_PORT})
    http = HttpGetAction(port={APP_PORT}, path="/ready")
    kw = dict(default_host="{INSTANCE_IP}", timeout=1)
    out = {{}}
    out["tcp_app_down_plain"] = await probe_once(tcp, source_address=None, **kw)
    out["tcp_app_down_bypass"] = await probe_once(tcp, source_address="127.0.0.6", **kw)
    out["http_app_down_bypass"] = await probe_once(http, source_address="127.0.0.6", **kw)
    app = await asyncio.start_server(http_app, "{INSTANCE_IP}", {APP_PORT})
    out["tcp_app_up_bypass"] = await probe_once(tcp, source_address="127.0.0.6", **kw)
    out["http_app_up_bypass"] = await probe_once(http, source_address="127.0.0.6", **kw)
    await asyncio.sleep(0.1)
    out["peers"] = peers
    app.close(); envoy.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"):
        pytest.skip("needs root, iproute2 and iptables")
    name = f"vmah-{uuid.uuid4().hex[:8]}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        # The instance IP lives on a veth inside the namespace, as on a VM's NIC (traffic to it still uses lo).
        run("ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        run("ip", "-n", name, "addr", "add", f"{INSTANCE_IP}/24", "dev", "v0")
        run("ip", "-n", name, "link", "set", "v0", "up")
        run("ip", "-n", name, "link", "set", "v1", "up")
        for rule in RULES:
            run("ip", "netns", "exec", name, "iptables", "-t", "nat", *rule.split())
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)


def test_bypass_source_reaches_the_app_not_envoy(netns: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Istio's TCP prober (no special source) is captured and "connects" to Envoy while the app is down.
    assert out["tcp_app_down_plain"] == [True, ""]
    refused = f"dial tcp {INSTANCE_IP}:{APP_PORT}: connect: connection refused"
    assert out["tcp_app_down_bypass"] == [False, refused]
    assert out["http_app_down_bypass"] == [
        False,
        f'Get "http://{INSTANCE_IP}:{APP_PORT}/ready": {refused}',
    ]
    assert out["tcp_app_up_bypass"] == [True, ""]
    assert out["http_app_up_bypass"] == [True, ""]
    assert len(out["peers"]["envoy"]) == 1  # only the plain probe was captured
    assert out["peers"]["app"] == ["127.0.0.6", "127.0.0.6"]
