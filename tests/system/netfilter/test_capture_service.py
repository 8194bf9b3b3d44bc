"""CaptureService: installed at start, repaired after a firewall flush, removed at stop."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.net import async_wait_for
from tests.system.netfilter.conftest import NetNs, require_tools
from vm_agent.netfilter import CaptureService, CaptureSettings, apply, show, verify

pytestmark = [pytest.mark.system]

SETTINGS = CaptureSettings(dns_servers_v4=("127.0.0.53",), exclude_interfaces=("eth9",), outbound_exclude_ports=(9,))


@pytest.mark.parametrize("backend", ["iptables", "nft"])
def test_verify_matches_right_after_apply_and_sees_a_flush(netns: NetNs, backend: str) -> None:
    require_tools("nft" if backend == "nft" else "iptables-save")
    for settings in (SETTINGS, CaptureSettings(capture_all_dns=True, ipv6=True, inbound_ports="80,443")):
        apply(settings, backend, netns=netns.name)
        assert verify(settings, backend, netns=netns.name) is None
    if backend == "nft":
        netns.run("nft", "flush", "chain", "inet", "vm_agent", "VMAGENT_OUTPUT")
    else:
        netns.run("iptables", "-t", "nat", "-F", "VMAGENT_OUTPUT")
    drift = verify(settings, backend, netns=netns.name)
    assert drift is not None
    assert "VMAGENT_OUTPUT" in drift


@pytest.mark.parametrize("backend", ["iptables", "nft"])
async def test_service_applies_repairs_and_cleans_up(netns: NetNs, backend: str) -> None:
    require_tools("nft" if backend == "nft" else "iptables-save")
    service = CaptureService(SETTINGS, backend, verify_interval=0.2, netns=netns.name)
    assert await service.check() is not None
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 20)
        assert await service.check() is None
        assert "VMAGENT_OUTPUT" in show(backend, netns=netns.name)
        snap = service.snapshot()
        assert snap["installed"] is True
        assert snap["backend"] == backend
        assert snap["applies"] == 1

        # What a firewall reload does to us.
        if backend == "nft":
            netns.run("nft", "delete", "table", "inet", "vm_agent")
        else:
            netns.run("iptables", "-t", "nat", "-D", "OUTPUT", "-j", "VMAGENT_OUTPUT")

        async def repaired() -> bool:
            return service.repairs == 1 and verify(SETTINGS, backend, netns=netns.name) is None

        await async_wait_for(repaired, timeout=20, what="capture repaired")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert show(netns=netns.name) == ""


async def test_service_reports_why_it_is_not_installed(netns: NetNs) -> None:
    require_tools("nft")
    service = CaptureService(SETTINGS, "nft", netns=netns.name + "-gone")
    task = asyncio.create_task(service.run())
    try:

        async def failed() -> bool:
            return bool(service.last_error)

        await async_wait_for(failed, timeout=20, what="first apply attempt")
        reason = await service.check()
        assert reason is not None
        assert reason.startswith("traffic capture not installed: `ip netns exec")
        assert service.snapshot()["installed"] is False
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_service_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="verify_interval"):
        CaptureService(CaptureSettings(), verify_interval=0)
    with pytest.raises(ValueError, match="'ufw' is not one of"):
        CaptureService(CaptureSettings(), "ufw")
