"""``vm-agent mesh serve`` back-end: it starts, says where it listens (mesh.json), serves the admin
API and stops cleanly when cancelled; ``mesh get`` finds it through the state folder."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import aiohttp
import pytest

from vm_agent.mesh import MeshSettings
from vm_agent.mesh.cli import mesh_get, mesh_serve
from vm_agent.mesh.samples import samples_dir

pytestmark = pytest.mark.integration


async def test_serve_get_and_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    settings = MeshSettings(
        state_dir=state, manifests_dir=samples_dir(), listen="127.0.0.1:0", admin_listen="127.0.0.1:0"
    )
    task = asyncio.create_task(mesh_serve(settings))
    for _ in range(200):
        if (state / "mesh.json").exists():
            break
        await asyncio.sleep(0.05)
    info = json.loads((state / "mesh.json").read_text())
    assert info["xds_address"].startswith("127.0.0.1:")
    admin = info["admin_url"]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{admin}/healthz") as r:
            assert (await r.text()) == "ok\n"
        async with s.get(f"{admin}/metrics") as r:
            assert "vm_agent_mesh_xds_connections" in await r.text()
        async with s.get(f"{admin}/v1/objects?kind=ServiceEntry") as r:
            items = (await r.json())["items"]
            assert [i["metadata"]["name"] for i in items] == ["external-api"]
        async with s.delete(f"{admin}/v1/objects/ServiceEntry/vm-demo/external-api") as r:
            assert r.status == 200
        async with s.delete(f"{admin}/v1/objects/ServiceEntry/vm-demo/external-api") as r:
            assert r.status == 404
    out = io.StringIO()
    assert await mesh_get("proxies", state=state, out=out) == 0
    assert out.getvalue().split() == ["ID", "NODE", "FLAVOR", "IDENTITY", "ACKED", "NACKED"]
    task.cancel()
    assert await task == 0
    assert not (state / "mesh.json").exists()
    assert (state / "objects.json").exists() and (state / "ca" / "root-cert.pem").exists()


async def test_serve_reports_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = MeshSettings(state_dir=tmp_path, listen=f"127.0.0.1:{port}", admin_listen="127.0.0.1:0")
        assert await mesh_serve(settings) == 1
