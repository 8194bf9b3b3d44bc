"""Run the built-in local mesh inside a test (loopback only, ports chosen by the kernel)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from vm_agent.mesh import MeshServer, MeshSettings

__all__ = ["MeshServer", "running_mesh"]


@asynccontextmanager
async def running_mesh(tmp_path: Path, manifests: str | None = None, **overrides: Any) -> AsyncIterator[MeshServer]:
    """A started MeshServer whose state lives in ``tmp_path/mesh-state``.

    ``manifests`` (YAML text) is applied before the server is ready; ``overrides`` go to MeshSettings
    (e.g. ``default_cert_ttl_s=10``, ``grace_period_s=0.5``, ``manifests_dir=...``).
    """
    settings_args: dict[str, Any] = {
        "state_dir": tmp_path / "mesh-state",
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
    }
    settings_args.update(overrides)
    mesh = MeshServer(MeshSettings(**settings_args))
    if manifests:
        mesh.apply_yaml(manifests, source="test")
    task = asyncio.create_task(mesh.run(), name="local-mesh")
    ready = asyncio.create_task(mesh.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task.done():
            task.result()  # raises the startup error
        task.cancel()
        raise TimeoutError("local mesh did not become ready within 30 s")
    try:
        yield mesh
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
