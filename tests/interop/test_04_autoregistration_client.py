"""Steps 4-6 with vm-agent's own node, metadata, CSR and upstream code on a bare ADS stream.

This isolates istiod's side of auto-registration, health and disconnect from the composition root: the
same assertions run through `vm-agent run` in test_10_agent.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.interop.conftest import VmGroup
from tests.interop.lab import (
    GRACE_PERIOD_S,
    ISTIOD_POD_NAME,
    WLE,
    ControlPlane,
    async_wait_until,
    healthy_condition,
)
from tests.interop.vmclient import CDS, HEALTH, AdsSession, issue_svid, load_config
from vm_agent.config import Config

pytestmark = [pytest.mark.interop]


def config_for(vm_files: Path, tmp_path: Path) -> Config:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    return load_config(vm_files, tmp_path / "state", resolv, {})


def check_registered(entry: dict[str, Any], group: VmGroup) -> None:
    meta = entry["metadata"]
    assert entry["spec"]["address"] == "127.0.0.2"
    assert entry["spec"]["serviceAccount"] == group.service_account
    assert entry["spec"]["ports"] == {"http": group.app_port}
    assert meta["labels"]["app"] == group.name
    ann = meta["annotations"]
    assert ann["istio.io/autoRegistrationGroup"] == group.name
    assert ann["istio.io/workloadController"] == ISTIOD_POD_NAME
    assert ann["istio.io/connectedAt"]
    assert "istio.io/disconnectedAt" not in ann
    # Only set when the node's PROXY_CONFIG carries the group's readinessProbe.
    assert ann["proxy.istio.io/health-checks-enabled"] == "true"
    (owner,) = meta["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("WorkloadGroup", group.name, True)


async def test_autoregistration_health_and_cleanup(
    control_plane: ControlPlane, group: VmGroup, vm_files: Path, tmp_path: Path
) -> None:
    cp = control_plane
    cfg = config_for(vm_files, tmp_path)
    key, chain = await issue_svid(cfg)
    name = f"{group.name}-127.0.0.2"

    def entry() -> dict[str, Any] | None:
        return cp.get(WLE, group.namespace, name)

    async with AdsSession(cfg, key, "".join(chain).encode()) as ads:
        ads.send(CDS)
        first = await ads.recv()
        assert first.type_url == CDS and first.resources, "istiod admitted the stream and pushed clusters"
        registered = await async_wait_until(entry, 30, f"WorkloadEntry {name}")
        check_registered(registered, group)
        assert healthy_condition(registered) is None, "no Healthy condition before the first report"

        # istiod retries a health write only ~150 ms, so the report is repeated until it lands (lab plan 1.3).
        def cond_is(status: str) -> Any:
            return lambda: (c := healthy_condition(entry())) is not None and c["status"] == status and c

        await async_wait_until(cond_is("True"), 30, "Healthy=True", tick=lambda: ads.send(HEALTH))
        down = await async_wait_until(
            cond_is("False"), 30, "Healthy=False", tick=lambda: ads.send(HEALTH, error="HTTP GET /ready: 503")
        )
        assert down["message"] == "HTTP GET /ready: 503"
        await async_wait_until(cond_is("True"), 30, "Healthy=True again", tick=lambda: ads.send(HEALTH))

    gone = await async_wait_until(
        lambda: (e := entry()) is not None and "istio.io/disconnectedAt" in e["metadata"]["annotations"] and e,
        30,
        "disconnectedAt annotation",
    )
    assert "istio.io/connectedAt" not in gone["metadata"]["annotations"]
    await async_wait_until(lambda: entry() is None, GRACE_PERIOD_S * 4, "WorkloadEntry deleted after the grace period")
    log = cp.istiod_log()
    assert f"auto-registered WorkloadEntry {group.namespace}/{name} with health checking enabled" in log
    assert f"cleaned up auto-registered WorkloadEntry {group.namespace}/{name} periodic:false" in log


async def test_reconnect_within_grace_period_keeps_the_entry(
    control_plane: ControlPlane, group: VmGroup, vm_files: Path, tmp_path: Path
) -> None:
    cp = control_plane
    cfg = config_for(vm_files, tmp_path)
    key, chain = await issue_svid(cfg)
    pem = "".join(chain).encode()
    name = f"{group.name}-127.0.0.2"

    def entry() -> dict[str, Any] | None:
        return cp.get(WLE, group.namespace, name)

    async with AdsSession(cfg, key, pem) as ads:
        ads.send(CDS)
        await ads.recv()
        first = await async_wait_until(entry, 30, f"WorkloadEntry {name}")
    uid = first["metadata"]["uid"]
    await async_wait_until(
        lambda: (e := entry()) is not None and "istio.io/disconnectedAt" in e["metadata"]["annotations"],
        30,
        "disconnectedAt annotation",
    )
    async with AdsSession(cfg, key, pem) as ads:
        ads.send(CDS)
        await ads.recv()
        back = await async_wait_until(
            lambda: (e := entry()) is not None and "istio.io/connectedAt" in e["metadata"]["annotations"] and e,
            30,
            "connectedAt after reconnect",
        )
        assert back["metadata"]["uid"] == uid, "the entry was recreated instead of kept"
        assert "istio.io/disconnectedAt" not in back["metadata"]["annotations"]
        # Outlive the grace period while connected: the entry must stay.
        await asyncio.sleep(GRACE_PERIOD_S + 2)
        kept = entry()
        assert kept is not None and kept["metadata"]["uid"] == uid
