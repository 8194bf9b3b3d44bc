"""vm_agent.interfaces (libc getifaddrs) against psutil's reading of the same host, and inside a namespace with
addresses this test sets up."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid

import psutil
import pytest

from vm_agent.interfaces import interface_addresses, scan_interface_ips


def test_same_addresses_as_psutil() -> None:
    up = {name for name, st in psutil.net_if_stats().items() if st.isup}
    expected = [
        (name, entry.address.split("%", 1)[0])
        for name, entries in psutil.net_if_addrs().items()
        for entry in entries
        if entry.family in (socket.AF_INET, socket.AF_INET6)
    ]
    assert interface_addresses(up_only=False) == expected
    assert interface_addresses() == [(n, a) for n, a in expected if n in up]


@pytest.mark.system
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
def test_scan_skips_loopback_link_local_and_down_interfaces() -> None:
    ns = f"vmaif{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:

        def ip(*args: str) -> None:
            subprocess.run(["ip", "-n", ns, *args], check=True)

        ip("link", "set", "lo", "up")
        ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ip("addr", "add", "10.99.0.2/24", "dev", "d0")
        ip("addr", "add", "fd99::2/64", "dev", "d0", "nodad")
        ip("addr", "add", "10.98.0.2/24", "dev", "d1")  # d1 stays down
        ip("link", "set", "d0", "up")
        code = "from vm_agent.interfaces import scan_interface_ips; print(scan_interface_ips())"
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "['10.99.0.2', 'fd99::2']"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_scan_never_returns_loopback() -> None:
    assert not any(a.startswith("127.") or a == "::1" for a in scan_interface_ips())
